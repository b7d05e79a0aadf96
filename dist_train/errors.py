"""The user-facing errors: each is printed as one line naming the thing at fault, never a traceback."""


class DistTrainError(Exception):
    """Bad input or a refused setup; the entry points print it as `error: <message>` and exit 2.

    `rank_local`: raised on one rank only (a bad image, an out-of-memory, a failed write), so that rank
    prints it, naming itself; otherwise every rank raised the same error and rank 0 alone prints it.
    """

    rank_local = False

    def __init__(self, message: str, *, rank_local: bool | None = None):
        super().__init__(message)
        if rank_local is not None:
            self.rank_local = rank_local

    def message(self) -> str:
        text = str(self)
        if "Original Traceback" in text:  # re-raised by a DataLoader worker: the original message is the last line
            last = text.strip().splitlines()[-1]
            return last.split(": ", 1)[1] if ": " in last else last
        return text


class ConfigError(DistTrainError):
    """An unknown key, a wrong type or an impossible combination in the run configuration."""


class DataError(DistTrainError):
    """A missing file, a missing column or a label outside the classes."""


class SampleError(DataError):
    """An image that cannot be read (truncated, empty, not an image), met by one rank while loading a batch."""

    rank_local = True


class CheckpointError(DistTrainError):
    """A checkpoint or weights file that is missing, incomplete or unsafe to load, or a save that failed."""


class ResourceError(DistTrainError):
    """This rank ran out of a resource (accelerator memory)."""

    rank_local = True


class TrainingError(DistTrainError):
    """Training cannot go on (non-finite losses or weights); decided by all ranks together."""


class DistributedSetupError(DistTrainError):
    """The processes that started disagree with what was asked for (e.g. an unsharded launch)."""


class ExportError(DistTrainError):
    """An export that cannot be written, or whose file disagrees with the PyTorch model it came from."""


OUT_OF_MEMORY_MESSAGES = ("CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED", "CUDA out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or what cuDNN and cuBLAS raise when they cannot allocate (a plain RuntimeError)."""
    import torch  # (here: a bad config is reported without importing torch)

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(m in str(exc) for m in OUT_OF_MEMORY_MESSAGES))
