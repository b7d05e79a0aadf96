"""The user-facing errors: each is printed as one line naming the thing at fault, never a traceback."""


class DistTrainError(Exception):
    """Bad input or a refused setup; the entry points print it as `error: <message>` and exit 2."""


class ConfigError(DistTrainError):
    """An unknown key, a wrong type or an impossible combination in the run configuration."""


class DataError(DistTrainError):
    """A missing file, a missing column or a label outside the classes."""


class CheckpointError(DistTrainError):
    """A checkpoint or weights file that is missing, incomplete or unsafe to load."""


class DistributedSetupError(DistTrainError):
    """The processes that started disagree with what was asked for (e.g. an unsharded launch)."""
