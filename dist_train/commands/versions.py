"""`--version`: dist_train's version with its stack's, one line for a bug report, read from the installed packages'
metadata (nothing heavy is imported: `dist-train --version` answers in a tenth of a second)."""
from __future__ import annotations

import argparse


def version_line() -> str:
    """dist_train's version with torch's, Accelerate's, Python's and the platform, one line for a bug report (read from
    the installed packages' metadata: nothing heavy is imported)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from dist_train import __version__

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return (f"dist_train {__version__} (torch {of('torch')}, torchvision {of('torchvision')}, accelerate {of('accelerate')}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.machine()})")


class PrintVersion(argparse.Action):
    """--version: version_line() as it is (argparse's own version action wraps it to the terminal's width), then exit."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print dist_train's, torch's, Accelerate's and Python's versions in one line, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line(), flush=True)
        parser.exit()
