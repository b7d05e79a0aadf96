"""Distillation's teacher, before training: which models teach (a checkpoint, a run's best, a cross-validation run's
fold ensemble), on which rows they may (no teacher of fold k that saw fold k's rows), and their outputs on the training
table -- computed once by the sharded inference (predict_split) into the run directory's cache, or that cache checked
(the teacher's fingerprint, the table's ids) and reused. The loop then reads the cache (models/distill.py).

    prepare_teacher(config)     every rank (the inference is sharded); the main process writes the cache
      find_teacher              the checkpoints, and the teacher's config: its model and preprocessing on our data
      check_honest              under cv.folds: fold k's teacher never saw fold k's rows, or the run is refused
      teacher_outputs           predict_split(..., split="table"), or the teacher's oof.csv (distill.cv_targets=oof)
"""
from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from dist_train.commands.inference import checkpoint_config_file, predict_split, resolve_weights
from dist_train.config import Config, config_from_dict, fold_output_dir, resolve, to_dict
from dist_train.config.locate import locate
from dist_train.data.tables import ids_digest
from dist_train.errors import ConfigError, DataError, DistTrainError
from dist_train.job.distributed import forget_process_group, is_main_process_env, say_main
from dist_train.loop.trainer import resume_argument
from dist_train.models.distill import TEACHER_CACHE, TEACHER_SPEC, cache_metadata, write_cache
from dist_train.models.tasks import label_names, load_table, load_task
from dist_train.rundir.checkpoint import CLASSES_FILE, sha256
from dist_train.rundir.files import atomic_path

PREPROCESSING_KEYS = ("channels", "image_size", "mean", "std", "preprocessing_from", "train_crop", "crop_scale",
                      "crop_ratio", "eval_crop_fraction")
"""The teacher's own: how its input is made (the rest of the data section -- where the rows are -- is the student's)."""
OOF_FILE, FOLD_PREDICTIONS = "oof.csv", "oof.safetensors"  # (cv.py's names: cv imports fit, which imports nothing here)


@dataclass
class Teacher:
    """The models that teach and how: `checkpoints` averaged (with distill.tta) under `config`, the teacher's own
    model and preprocessing on the student's data; or (`oof`) a cross-validation teacher's out-of-fold predictions."""

    source: Path
    config: Config
    labels: list[str] | dict
    checkpoints: list[Path]
    oof: Path | None = None
    cv_dir: bool = False


def prepare_teacher(config: Config, resume: str | None = None, overwrite: bool = False) -> Path | None:
    """The cached teacher outputs of `config`'s run (distill.teacher): reused when the cache in the run directory matches
    the teacher and the training table (else refused, naming which, unless `overwrite`: then computed again), computed
    when there is none; with distill.live, teacher.json instead. Every rank calls it; returns the file's path."""
    config = resolve(config)
    if config.distill.teacher is None:
        return None
    output_dir = Path(config.output_dir)
    resume_argument(output_dir, resume, overwrite)  # an existing run without --resume/--overwrite: refused before the teacher runs
    records, labels, task = load_table(config)
    teacher = find_teacher(config)
    if label_names(teacher.labels) != label_names(labels):
        raise ConfigError(f"distill.teacher {teacher.source} predicts {_names(teacher.labels)}; the training table "
                          f"{_names(labels)}: a teacher must predict the student's classes")
    check_honest(config, teacher)
    fingerprint, describe = teacher_fingerprint(teacher)
    if config.distill.live:
        return write_spec(teacher, output_dir / TEACHER_SPEC, fingerprint, overwrite)
    path = output_dir / TEACHER_CACHE
    if path.is_file() and not overwrite:
        check_cache(path, fingerprint, records.ids, teacher.source)
        say_main(f"distill: the teacher's outputs cached in {path} match the teacher and the training table: reused")
        return path
    started = time.perf_counter()
    outputs = teacher_outputs(teacher, records.ids, task)
    if is_main_process_env():
        output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            write_cache(tmp, outputs, records.ids, fingerprint, describe)
        how = (f"read from {teacher.oof}" if teacher.oof is not None else
               f"{len(teacher.checkpoints)} checkpoint(s){', hflip TTA' if config.distill.tta == 'hflip' else ''}")
        say_main(f"distill: the teacher's outputs on the {len(records.ids)} rows of the training table ({how}) computed once "
                 f"in {time.perf_counter() - started:.1f} s and cached in {path}")
    return path


def find_teacher(config: Config) -> Teacher:
    """distill.teacher resolved: a cross-validation run's directory is its folds' ensemble (under cv.folds: the fold
    of the student's fold, or its oof.csv); a run directory its best checkpoint; a checkpoint itself."""
    found = locate(config.distill.teacher, accept=("checkpoint", "run", "cv", "weights"), what="distill.teacher")
    cv_dir = found.inner.form == "cv"
    source = found.inner.home if cv_dir else Path(config.distill.teacher)  # (a study's best trial, when it is a CV run)
    file = found.inner.home / "config.yaml"
    if not file.is_file():
        raise ConfigError(f"distill.teacher {config.distill.teacher}: no config.yaml in {found.inner.home} (the teacher's "
                          f"model and preprocessing): name its checkpoint or run directory")
    oof = None
    if config.cv.folds and cv_dir and config.distill.cv_targets == "oof":
        oof, checkpoints = source / OOF_FILE, []
        if not oof.is_file():
            raise ConfigError(f"distill.cv_targets=oof: the teacher {source} has no {OOF_FILE} (its cross-validation is not "
                              f"finished: train.py ... --resume auto)")
    elif config.cv.folds and cv_dir:
        checkpoints = [fold_output_dir(source, config.cv.fold) / "checkpoints" / "best"]
        if not checkpoints[0].is_dir():
            raise ConfigError(f"distill.teacher {source}: its fold {config.cv.fold} has no best checkpoint "
                              f"({checkpoints[0]}); train it first")
    else:
        checkpoints = list(found.checkpoints)
    say_main(found.line("distill.teacher"))
    first = checkpoint_config_file(checkpoints[0]) if checkpoints else file
    own = yaml.safe_load(first.read_text()) or {}
    labels = (json.loads((resolve_weights(checkpoints[0]).parent / CLASSES_FILE).read_text()) if checkpoints
              else _oof_labels(oof))
    return Teacher(source, teacher_config(config, own), labels, checkpoints, oof, cv_dir)


def teacher_config(config: Config, own: dict) -> Config:
    """The teacher's saved config on the student's data: its model, task and preprocessing (PREPROCESSING_KEYS), the
    student's rows, distill.tta as its test-time augmentation, no cross-validation of its own."""
    student = to_dict(config)
    data = {**student["data"], **{k: v for k, v in (own.get("data") or {}).items() if k in PREPROCESSING_KEYS},
            "pseudo_labels": None}
    inference = {**(own.get("inference") or {}), "tta": config.distill.tta}
    raw = {**own, "data": data, "inference": inference, "output_dir": config.output_dir, "seed": config.seed, "cv": {},
           "distill": {}}
    return config_from_dict(raw)


def check_honest(config: Config, teacher: Teacher) -> None:
    """Under cv.folds the teacher of fold k must not have seen fold k's rows (OOF honesty): a cross-validation teacher
    whose fold k held out exactly the student's fold k (distill.cv_targets=fold), or its out-of-fold predictions
    (oof); anything else is refused. Without cv.folds: said when the teacher trained on the student's validation rows."""
    if not config.cv.folds:
        _warn_seen_validation(config, teacher)
        return
    if not teacher.cv_dir:
        raise ConfigError(f"distill.teacher {teacher.source} is not a cross-validation run: under cv.folds the teacher of "
                          f"fold k must not have seen fold k's validation rows, and one model trained on the table saw "
                          f"them. Teach with a cross-validation run of the same folds (cv.folds, cv.seed, "
                          f"data.group_column as here): its fold k teaches fold k (distill.cv_targets=fold), or its "
                          f"oof.csv does (oof)")
    if teacher.oof is not None:
        return
    held_out = fold_output_dir(teacher.source, config.cv.fold) / FOLD_PREDICTIONS
    if not held_out.is_file():
        raise ConfigError(f"distill.teacher {teacher.source}: its fold {config.cv.fold} is not finished ({held_out} "
                          f"missing); train it first")
    _, val, _, _ = load_task(config)
    with safe_open(str(held_out), "pt") as f:
        theirs = (f.metadata() or {}).get("ids_sha256")
    if theirs != ids_digest(val.ids):
        raise ConfigError(f"distill.teacher {teacher.source}: its fold {config.cv.fold} held out other rows than this "
                          f"run's fold {config.cv.fold} ({len(val.ids)} rows): it trained on some of them, and would leak "
                          f"them into the student. Use the teacher's folds (its cv.folds, cv.seed, data.group_column and "
                          f"table), or distill.cv_targets=oof")


def _warn_seen_validation(config: Config, teacher: Teacher) -> None:
    """A hold-out student: how many of its validation rows the teacher trained on (its scores are then optimistic)."""
    try:
        _, val, _, _ = load_task(config)
        if teacher.cv_dir:
            with open(teacher.source / OOF_FILE, newline="") as f:
                seen = {row["id"] for row in csv.DictReader(f)}
        else:
            own = yaml.safe_load(checkpoint_config_file(teacher.checkpoints[0]).read_text()) or {}
            seen = set(load_task(config_from_dict(own))[0].ids)
    except (OSError, DistTrainError):  # the teacher's own data is not where it was: nothing to compare
        return
    shared = sum(row in seen for row in val.ids)
    if shared:
        say_main(f"distill: warning: the teacher trained on {shared} of the {len(val.ids)} validation rows: what it learnt of "
                 f"them reaches the student through its outputs, so the student's validation scores are optimistic. "
                 f"Score it on rows the teacher never saw (a test set), or cross-validate the student (cv.folds) with a "
                 f"cross-validation teacher of the same folds")


def write_spec(teacher: Teacher, path: Path, fingerprint: str, overwrite: bool) -> Path:
    """distill.live: teacher.json, what the loop builds the teacher from (its weights files, config and classes); the
    one of an earlier start must be of the same teacher (a resumed run goes on learning from the teacher it began with)."""
    if teacher.oof is not None:
        raise ConfigError("distill.live runs the teacher's models; distill.cv_targets=oof has only their predictions")
    if path.is_file() and not overwrite:
        saved = json.loads(path.read_text()).get("fingerprint")
        if saved != fingerprint:
            raise DataError(f"{path} describes another teacher (fingerprint {str(saved)[:12]}; distill.teacher "
                            f"{teacher.source} is now {fingerprint[:12]}: other weights, preprocessing, TTA or classes). "
                            f"Start afresh with --overwrite, or delete the file")
    spec = {"fingerprint": fingerprint, "labels": teacher.labels, "config": to_dict(teacher.config),
            "weights": [str(resolve_weights(c, teacher.config.inference.weights).resolve()) for c in teacher.checkpoints]}
    if is_main_process_env():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(spec, indent=1))
        say_main(f"distill: the teacher ({len(spec['weights'])} checkpoint(s)) runs live on every training batch "
                 f"(distill.live=true): {path}")
    return path


def teacher_fingerprint(teacher: Teacher) -> tuple[str, dict]:
    """sha256 of what the teacher's outputs depend on -- its weights files (or its oof.csv), its preprocessing, TTA and
    classes -- and that description itself (stored in the cache)."""
    data = to_dict(teacher.config)["data"]
    describe = {
        "teacher": str(teacher.source),
        "checkpoints": [str(c) for c in teacher.checkpoints],
        "weights_sha256": [sha256(resolve_weights(c, teacher.config.inference.weights)) for c in teacher.checkpoints],
        "oof_sha256": sha256(teacher.oof) if teacher.oof is not None else None,
        "preprocessing": {k: data[k] for k in PREPROCESSING_KEYS if k != "preprocessing_from"},
        "tta": teacher.config.inference.tta,
        "labels": teacher.labels,
    }
    content = {k: v for k, v in describe.items() if k not in ("teacher", "checkpoints")}  # where they are does not count
    return sha256_text(json.dumps(content, sort_keys=True)), describe


def check_cache(path: Path, fingerprint: str, ids: list[str], source: Path) -> None:
    """A cache of another teacher or another training table is refused, naming which."""
    saved = cache_metadata(path)
    if saved.get("fingerprint") != fingerprint:
        raise DataError(f"{path} holds the outputs of another teacher (fingerprint {str(saved.get('fingerprint'))[:12]}; "
                        f"distill.teacher {source} is now {fingerprint[:12]}: other weights, preprocessing, TTA or "
                        f"classes). Start afresh with --overwrite (computes them again), or delete the file")
    if saved.get("ids_sha256") != ids_digest(ids):
        raise DataError(f"{path} holds the teacher's outputs of another training table ({saved.get('rows')} rows, ids "
                        f"sha256 {str(saved.get('ids_sha256'))[:12]}; the table now has {len(ids)} rows, "
                        f"{ids_digest(ids)[:12]}). Start afresh with --overwrite (computes them again), or delete the file")


def teacher_outputs(teacher: Teacher, ids: list[str], task) -> torch.Tensor:
    """The teacher's outputs on the rows `ids` of the training table, in that order: the sharded inference of its
    checkpoints (every rank), or its out-of-fold probabilities as log-probabilities (heads: each head's marginals)."""
    if teacher.oof is not None:
        return _oof_outputs(teacher.oof, ids, task)
    try:
        prediction = predict_split(teacher.config, teacher.checkpoints, split="table")
    finally:
        forget_process_group()
    if prediction.row_ids != list(ids):
        raise DataError("the teacher predicted other rows than the training table's")  # (one table read twice)
    return prediction.outputs.float()


def _oof_outputs(path: Path, ids: list[str], task) -> torch.Tensor:
    with open(path, newline="") as f:
        rows = {row["id"]: row for row in csv.DictReader(f)}
    missing = [row for row in ids if row not in rows]
    if missing:
        raise DataError(f"{path}: {len(missing)} rows of the training table are not in it (e.g. {missing[0]!r}): the "
                        f"teacher cross-validated another table")
    probabilities = torch.tensor([[float(rows[row][f"prob_{c}"]) for c in task.class_names] for row in ids],
                                 dtype=torch.float64)
    if task.kind == "multihead":  # the combined classes' probabilities -> each head's marginals
        combined = torch.arange(len(task.class_names))
        columns = []
        for h, size in reversed(list(enumerate(task.sizes))):
            columns.insert(0, torch.nn.functional.one_hot(combined % size, size).double())
            combined = combined // size
        probabilities = probabilities @ torch.cat(columns, dim=1)
    if task.kind == "multilabel":  # each class's probability as its logit (a sigmoid gives it back)
        return torch.logit(probabilities, eps=1e-7).float()
    return probabilities.clamp(min=1e-30).log().float()  # 6 significant digits written: a 0 stays finite


def _oof_labels(oof: Path) -> list[str] | dict:
    """The classes of a cross-validation teacher: its first fold's classes.json."""
    fold = fold_output_dir(oof.parent, 0) / "checkpoints" / "best" / CLASSES_FILE
    if not fold.is_file():
        raise ConfigError(f"distill.teacher {oof.parent}: no {fold}")
    return json.loads(fold.read_text())


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _names(labels) -> str:
    if isinstance(labels, list):
        return f"classes {labels}"
    return f"classes {labels['multilabel']}" if "multilabel" in labels else f"heads {labels.get('heads', labels)}"
