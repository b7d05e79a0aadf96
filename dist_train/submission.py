"""The submission CSV: one row per input id, in the input's order, written atomically by one process."""
from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path


def write_submission(path: Path, ids: list[str], labels: list[str], id_column: str = "id", label_column: str = "label",
                     extra: dict[str, list] | None = None) -> Path:
    """`extra`: more columns (e.g. per-class probabilities), one value per row each."""
    extra = extra or {}
    if len(ids) != len(labels) or any(len(v) != len(ids) for v in extra.values()):
        raise ValueError(f"submission: {len(ids)} ids but {len(labels)} labels or another column's length differs")
    if len(set(ids)) != len(ids):
        raise ValueError("submission: duplicate ids")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temporary of its own (not a fixed name): two predictions into one file each leave it whole
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow([id_column, label_column, *extra])
            writer.writerows(zip(ids, labels, *extra.values()))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
