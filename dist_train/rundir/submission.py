"""The submission CSV: one row per input id, in the input's order, written atomically by one process."""
from __future__ import annotations

import csv
from pathlib import Path

from dist_train.rundir.files import atomic_path


def write_submission(path: Path, ids: list[str], labels: list[str], id_column: str = "id", label_column: str = "label",
                     extra: dict[str, list] | None = None) -> Path:
    """`extra`: more columns (e.g. per-class probabilities), one value per row each."""
    extra = extra or {}
    if len(ids) != len(labels) or any(len(v) != len(ids) for v in extra.values()):
        raise ValueError(f"submission: {len(ids)} ids but {len(labels)} labels or another column's length differs")
    if len(set(ids)) != len(ids):
        raise ValueError("submission: duplicate ids")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([id_column, label_column, *extra])
        writer.writerows(zip(ids, labels, *extra.values()))
    return path
