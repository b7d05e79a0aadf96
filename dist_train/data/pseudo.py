"""Pseudo-labels: the test rows a model predicted confidently, joined to the training rows with its probabilities as soft
targets (data.pseudo_labels, data.pseudo_threshold). They join a split's training rows only after the validation rows
(the hold-out, or cv fold k) are chosen from the labelled table, so no pseudo-labelled row is ever validated on."""
from __future__ import annotations

from pathlib import Path

from dist_train.config import DataConfig
from dist_train.data.splits import load_test_records
from dist_train.data.tables import Records, read_csv
from dist_train.errors import DataError


def pseudo_labelled(cfg: DataConfig, classes: list[str], id_column: str) -> tuple[Records, dict]:
    """The rows of the predictions file cfg.pseudo_labels (a submission written with inference.probabilities=true: its
    `id_column`, prob_<class> for every class) whose highest probability reaches cfg.pseudo_threshold, as Records of the
    test split's images with their probabilities (normalised to sum 1) as targets; and what was added (run_info.json)."""
    path = Path(cfg.pseudo_labels)
    if not path.is_file():
        raise DataError(f"data.pseudo_labels: no predictions file at {path} (predict.py --checkpoint ... "
                        f"inference.probabilities=true --output {path} writes one)")
    columns = [f"prob_{c}" for c in classes]
    rows = read_csv(path, [id_column, *columns])
    test = load_test_records(cfg)
    where = {row_id: i for i, row_id in enumerate(test.ids)}
    unknown = [row[id_column] for row in rows if row[id_column] not in where]
    if unknown:
        raise DataError(f"data.pseudo_labels {path}: {len(unknown)} ids are not in the test table (e.g. {unknown[0]!r}): "
                        f"the file must be a prediction of data.test")
    kept, targets = [], []
    for line, row in enumerate(rows, 2):
        try:
            probabilities = [float(row[c]) for c in columns]
        except ValueError:
            raise DataError(f"data.pseudo_labels {path}: line {line} has a probability that is not a number") from None
        total = sum(probabilities)
        if not total > 0 or min(probabilities) < 0:
            raise DataError(f"data.pseudo_labels {path}: line {line}'s probabilities are not a distribution")
        if max(probabilities) >= cfg.pseudo_threshold:
            kept.append(where[row[id_column]])
            targets.append(tuple(p / total for p in probabilities))
    records = test.take(kept)
    records.targets = targets
    records.labels = {cfg.label_column: [classes[max(range(len(t)), key=t.__getitem__)] for t in targets]}
    info = {"file": str(path), "threshold": cfg.pseudo_threshold, "predicted_rows": len(rows), "added": len(kept),
            "per_class": {c: sum(label == c for label in records.labels[cfg.label_column]) for c in classes}}
    return records, info


def with_pseudo_labels(train: Records, pseudo: Records, num_classes: int) -> Records:
    """The training rows followed by the pseudo-labelled ones; every target a distribution (a class as its one-hot row),
    so that one batch can hold both."""
    onehot = [tuple(1.0 if c == t else 0.0 for c in range(num_classes)) for t in train.targets]
    groups = None
    if train.split_groups is not None:
        groups = [*train.split_groups, *[f"pseudo-label {row_id}" for row_id in pseudo.ids]]
    labels = None
    if train.labels is not None:
        labels = {k: [*v, *(pseudo.labels or {}).get(k, [""] * len(pseudo.ids))] for k, v in train.labels.items()}
    return Records([*train.paths, *pseudo.paths], [*onehot, *pseudo.targets], [*train.ids, *pseudo.ids], labels,
                   None, groups)
