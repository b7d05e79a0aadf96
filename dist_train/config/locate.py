"""What a `--checkpoint` (and distill.teacher, model.pretrained, Trainer.predict) names, the same for every command.

    locate(path)            the one reading of a path, by what it holds:
      study                 hpo_summary.json: its best trial (a run or a cross-validation run), said with its score
      cv                    config.yaml with cv.folds and no cv.fold: every fold's best (or last) checkpoint
      run                   checkpoints/: its best (or last) checkpoint
      checkpoint            manifest.json or model.safetensors: itself (a step, best/last, a soup)
      weights               a file: itself (a .safetensors, .pt or .bin of weights)

Each command says which forms it takes (`accept`) and refuses the others in one line naming the form it wants. It lives
with the config (the base layer) because model.pretrained is resolved while the config is, before any model exists.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from dist_train.config.sections import fold_output_dir
from dist_train.errors import CheckpointError, ConfigError

HPO_SUMMARY_FILE = "hpo_summary.json"
"""In a study's directory: its trials and the best one."""
FORMS = ("checkpoint", "run", "cv", "study", "weights")
NAMES = {"checkpoint": "a checkpoint directory", "run": "a run directory", "cv": "a cross-validation run's directory",
         "study": "a study's directory", "weights": "a weights file"}


@dataclass(frozen=True)
class Located:
    """A path read as one of FORMS: the checkpoints it stands for (weights: the file) and `home`, the directory whose
    config.yaml (and a cross-validation run's thresholds.json) they go with."""

    given: str
    form: str
    checkpoints: tuple[Path, ...]
    home: Path
    trial: "Located | None" = None
    """A study's best trial, located."""
    said: str = ""

    @property
    def inner(self) -> "Located":
        """What is predicted with: a study's trial, else itself."""
        return self.trial if self.trial is not None else self

    def line(self, what: str = "--checkpoint") -> str:
        """One line: what the path was read as and what it stands for."""
        return f"{what} {self.given}: {self.said}"


def locate(path: str | Path, *, last: bool = False, accept: tuple[str, ...] = FORMS, what: str = "--checkpoint",
           wants: str | None = None) -> Located:
    """Read `path` as one of FORMS (`last`: a run's or each fold's `last` checkpoint instead of its `best`); a form not in
    `accept` (a study: its best trial's form) is a ConfigError naming the form found and `wants` (default: the accepted
    forms)."""
    found = _read(Path(path), str(path), last, what)
    inner = found.inner.form
    if inner not in accept:  # (a study is taken where its best trial is)
        form = f"{NAMES[found.form]} (its best trial is {NAMES[inner]})" if found.form == "study" else NAMES[found.form]
        wanted = wants or ", ".join(NAMES[f] for f in accept)
        raise ConfigError(f"{what} {path} is {form}; this takes {wanted}")
    return found


def _read(path: Path, given: str, last: bool, what: str) -> Located:
    which = "last" if last else "best"
    if path.is_file():
        return Located(given, "weights", (path,), path.parent, said="a weights file")
    if not path.is_dir():
        raise CheckpointError(f"{what} {given}: no such file or directory")
    if (path / HPO_SUMMARY_FILE).is_file():
        summary = json.loads((path / HPO_SUMMARY_FILE).read_text())
        best = summary.get("best")
        if not best:
            raise CheckpointError(f"{what} {given} is a study without a complete trial yet ({path / HPO_SUMMARY_FILE})")
        trial = _read(path / best["dir"], str(path / best["dir"]), last, what)
        said = (f"a study: its best trial, {trial.given} ({summary.get('objective')} {best['value']:.4f}), "
                f"{trial.said}")
        return Located(given, "study", trial.checkpoints, trial.home, trial, said)
    saved = _saved_config(path) if (path / "config.yaml").is_file() else {}
    if (saved.get("hpo") or {}).get("trials"):
        raise CheckpointError(f"{what} {given} is a study without a complete trial yet (no {HPO_SUMMARY_FILE})")
    cv = saved.get("cv") or {}
    if cv.get("folds") and cv.get("fold") is None and (path / "checkpoints").is_dir():
        raise CheckpointError(f"{what} {given} holds a run's checkpoints/ and a cross-validation run's config.yaml (one "
                              f"output_dir used for both): name the checkpoint ({path / 'checkpoints' / 'best'}) or a "
                              f"fold ({fold_output_dir(path, 0)}), or give each run its own output_dir")
    if cv.get("folds") and cv.get("fold") is None:
        folds = [fold_output_dir(path, k) / "checkpoints" / which for k in range(cv["folds"])]
        missing = [str(f) for f in folds if not f.is_dir()]
        if missing:
            raise CheckpointError(f"{what} {given}: a cross-validation run of {cv['folds']} folds, but {len(missing)} "
                                  f"fold(s) have no {which} checkpoint ({', '.join(missing)}); train them (train.py ... "
                                  f"--resume auto), or name the folds' checkpoints yourself")
        return Located(given, "cv", tuple(folds), path, said=f"a cross-validation run: the {which} checkpoints of its "
                                                             f"{cv['folds']} folds")
    if (path / "checkpoints").is_dir():
        checkpoint = path / "checkpoints" / which
        if not checkpoint.is_dir():
            raise CheckpointError(f"{what} {given}: a run without a {which} checkpoint yet ({checkpoint})"
                                  f"{'; --last takes its last one' if not last else ''}")
        return Located(given, "run", (checkpoint,), checkpoint, said=f"a run: its {which} checkpoint, "
                                                                     f"{checkpoint.resolve().name}")
    if (path / "manifest.json").is_file() or (path / "model.safetensors").is_file():
        return Located(given, "checkpoint", (path,), path, said="a checkpoint")
    raise CheckpointError(f"{what} {given}: not a checkpoint, a run, a cross-validation run or a study directory (no "
                          f"manifest.json, checkpoints/, config.yaml with cv.folds, or {HPO_SUMMARY_FILE})")


def _saved_config(directory: Path) -> dict:
    return yaml.safe_load((directory / "config.yaml").read_text()) or {}
