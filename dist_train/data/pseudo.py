"""Pseudo-labels: the test rows a model predicted confidently, joined to the training rows with its probabilities as soft
targets (data.pseudo_labels, data.pseudo_threshold). They join a split's training rows only after the validation rows
(the hold-out, or cv fold k) are chosen from the labelled table, so no pseudo-labelled row is ever validated on."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dist_train.config import DataConfig
from dist_train.data.columns import Column, PathColumn
from dist_train.data.splits import load_test_records
from dist_train.data.table_cache import open_table
from dist_train.data.tables import Records, check_columns
from dist_train.errors import DataError


def pseudo_labelled(cfg: DataConfig, classes: list[str], id_column: str, multilabel: bool = False) -> tuple[Records, dict]:
    """The rows of the predictions file cfg.pseudo_labels (a submission written with inference.probabilities=true: its
    `id_column`, prob_<class> for every class) whose highest probability reaches cfg.pseudo_threshold, as Records of the
    test split's images with their probabilities (normalised to sum 1) as targets; and what was added (run_info.json).
    `multilabel`: each class's probability is its own; a row joins when every class is confident (its probability, or
    one minus it, reaches the threshold), with its probabilities as they are as targets."""
    path = Path(cfg.pseudo_labels)
    if not path.is_file():
        raise DataError(f"data.pseudo_labels: no predictions file at {path} (predict.py --checkpoint ... "
                        f"inference.probabilities=true --output {path} writes one)")
    columns = [f"prob_{c}" for c in classes]
    table = open_table(path, cfg.cache_dir)
    check_columns(path, table.names, [id_column, *columns])
    test = load_test_records(cfg)
    ids = table.column(id_column).arrow()
    where = pc.index_in(ids, value_set=test.ids.arrow())  # each predicted row's position in the test table
    if where.null_count:
        unknown = ids[pc.index(pc.is_null(where), True).as_py()].as_py()
        raise DataError(f"data.pseudo_labels {path}: {where.null_count} ids are not in the test table (e.g. {unknown!r}): "
                        f"the file must be a prediction of data.test")
    probabilities = np.stack([_numbers(table.column(c).arrow(), path) for c in columns], 1) if len(ids) else \
        np.zeros((0, len(classes)))
    if multilabel:
        return _multilabel(cfg, classes, path, test, where, probabilities, len(ids))
    total = probabilities.sum(1)
    bad = np.flatnonzero(~(total > 0) | (probabilities.min(1, initial=0.0) < 0))
    if len(bad):
        raise DataError(f"data.pseudo_labels {path}: line {bad[0] + 2}'s probabilities are not a distribution")
    kept = np.flatnonzero(probabilities.max(1, initial=0.0) >= cfg.pseudo_threshold)
    records = test.take(where.to_numpy(zero_copy_only=False)[kept].astype(np.int64))
    normalised = probabilities[kept] / total[kept, None]
    records.targets = torch.from_numpy(normalised).float()
    winners = normalised.argmax(1) if len(kept) else np.zeros(0, dtype=np.int64)
    records.labels = {cfg.label_column: Column.of([classes[i] for i in winners])}
    counts = np.bincount(winners, minlength=len(classes))
    info = {"file": str(path), "threshold": cfg.pseudo_threshold, "predicted_rows": len(ids), "added": len(kept),
            "per_class": {c: int(n) for c, n in zip(classes, counts)}}
    return records, info


def _multilabel(cfg: DataConfig, classes: list[str], path: Path, test: Records, where, probabilities: np.ndarray,
                predicted: int) -> tuple[Records, dict]:
    bad = np.flatnonzero((probabilities.min(1, initial=0.0) < 0) | (probabilities.max(1, initial=0.0) > 1))
    if len(bad):
        raise DataError(f"data.pseudo_labels {path}: line {bad[0] + 2} has a probability outside [0, 1]")
    confidence = np.maximum(probabilities, 1.0 - probabilities).min(1, initial=1.0)
    kept = np.flatnonzero(confidence >= cfg.pseudo_threshold)
    records = test.take(where.to_numpy(zero_copy_only=False)[kept].astype(np.int64))
    records.targets = torch.from_numpy(probabilities[kept]).float()
    present = probabilities[kept] >= 0.5
    records.labels = {cfg.label_column: Column.of([" ".join(classes[c] for c in np.flatnonzero(row)) for row in present])}
    info = {"file": str(path), "threshold": cfg.pseudo_threshold, "predicted_rows": predicted, "added": len(kept),
            "per_class": {c: int(n) for c, n in zip(classes, present.sum(0))}}
    return records, info


def _numbers(column, path: Path) -> np.ndarray:
    try:
        return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        for line, value in enumerate(column.to_pylist(), 2):
            try:
                float(value)
            except ValueError:
                raise DataError(f"data.pseudo_labels {path}: line {line} has a probability that is not a number") from None
        return np.array([float(v) for v in column.to_pylist()])


def with_pseudo_labels(train: Records, pseudo: Records, num_classes: int) -> Records:
    """The training rows followed by the pseudo-labelled ones; every target a distribution (a class as its one-hot row),
    so that one batch can hold both (multi-label targets are rows of per-class values already)."""
    onehot = train.targets.float() if train.targets.ndim == 2 else torch.nn.functional.one_hot(train.targets, num_classes).float()
    groups = None
    if train.split_groups is not None:
        groups = Column.concat(train.split_groups, Column(pc.binary_join_element_wise("pseudo-label ", pseudo.ids.arrow(), "")))
    labels = None
    if train.labels is not None:
        labels = {k: Column.concat(v, (pseudo.labels or {}).get(k) or Column.of([""] * len(pseudo.ids)))
                  for k, v in train.labels.items()}
    return Records(PathColumn.concat(train.paths, pseudo.paths), torch.cat([onehot, pseudo.targets]),
                   Column.concat(train.ids, pseudo.ids), labels, None, groups)
