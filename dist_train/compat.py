"""The import paths from before the subpackages (dist_train/*.py, flat, until 2026-12): `dist_train.checkpoint`,
`dist_train.losses`, `python -m dist_train.synthetic` ... still import, as the module that now holds them, so a
user's model.file / data.file / loss.file written against them runs unchanged. New code imports the new paths."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "api": "dist_train.commands.api",
    "batchnorm": "dist_train.models.batchnorm",
    "build": "dist_train.loop.build",
    "checkpoint": "dist_train.rundir.checkpoint",
    "cli": "dist_train.commands.cli",
    "cv": "dist_train.commands.cv",
    "debug": "dist_train.commands.debug",
    "decode": "dist_train.data.decode",
    "distributed": "dist_train.job.distributed",
    "elastic": "dist_train.loop.elastic",
    "ema": "dist_train.models.ema",
    "engine": "dist_train.loop.engine",
    "export": "dist_train.commands.export",
    "faults": "dist_train.job.faults",
    "files": "dist_train.rundir.files",
    "guard": "dist_train.loop.guard",
    "inference": "dist_train.commands.inference",
    "layout": "dist_train.job.layout",
    "losses": "dist_train.models.losses",
    "metrics": "dist_train.models.metrics",
    "mixing": "dist_train.data.mixing",
    "optim": "dist_train.models.optim",
    "parity": "dist_train.commands.parity",
    "policy": "dist_train.loop.policy",
    "ranks": "dist_train.loop.ranks",
    "report": "dist_train.rundir.report",
    "runlock": "dist_train.rundir.runlock",
    "scaffold": "dist_train.commands.scaffold",
    "submission": "dist_train.rundir.submission",
    "synthetic": "dist_train.data.synthetic",
    "tasks": "dist_train.models.tasks",
    "timm_backbones": "dist_train.models.timm_backbones",
    "tracking": "dist_train.rundir.tracking",
    "trainer": "dist_train.loop.trainer",
}
"""Old module (dist_train.<old>) -> the module that holds its code now. dist_train.data, dist_train.config and
dist_train.models are packages of the same names: their __init__ answers the old modules' names."""


def moved_names(package: str, homes: dict[str, str], name: str):
    """A package's module __getattr__ for the names its old flat module held: `homes` maps name -> submodule."""
    if name not in homes:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{package}.{homes[name]}"), name)


class OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports dist_train.<old> as the module in MOVED (one module object under both names)."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname[len("dist_train."):] if fullname.startswith("dist_train.") else None
        if old not in MOVED:
            return None
        # its file as origin: `python -m dist_train.<old>` sets sys.argv[0] from it
        return importlib.util.spec_from_loader(fullname, self, origin=importlib.util.find_spec(MOVED[old]).origin)

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name[len("dist_train."):]])
        spec.loader_state = module.__spec__  # the import system is about to set the old name's spec on it
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = module.__spec__.loader_state

    def get_code(self, fullname):
        """`python -m dist_train.<old>` runs the new module's code."""
        new = MOVED[fullname[len("dist_train."):]]
        return importlib.util.find_spec(new).loader.get_code(new)


def install() -> None:
    if not any(isinstance(finder, OldPaths) for finder in sys.meta_path):
        sys.meta_path.append(OldPaths())
