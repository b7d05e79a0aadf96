"""The built-in example data: scikit-learn's 1,797 handwritten digits written once as PNGs and CSV tables. Light on
purpose (no torch): `dist-train new` writes them into a new project in a second or two."""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from dist_train.errors import DataError

DIGITS_SPLIT_SEED = 0
DIGITS_MARKER = ".complete"


def materialize_digits(root: Path) -> None:
    """Write scikit-learn's 1,797 digits once as 8x8 PNGs + train/val CSVs + an unlabelled info.csv.

    The split is fixed (stratified 70/15/15, seed 0). Written into a temporary directory and renamed,
    so concurrent processes or an interrupted run never see a half-written data set.
    """
    if (root / DIGITS_MARKER).is_file():
        return
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    labels = digits.target
    index = np.arange(len(labels))
    train_idx, rest = train_test_split(index, test_size=0.3, random_state=DIGITS_SPLIT_SEED, stratify=labels)
    val_idx, test_idx = train_test_split(rest, test_size=0.5, random_state=DIGITS_SPLIT_SEED, stratify=labels[rest])

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image, mode="L").save(tmp / "images" / f"{i:04d}.png")

    def write(name: str, idx, header: list[str], row) -> None:
        with open(tmp / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(row(i) for i in sorted(idx))

    write("train.csv", train_idx, ["id", "image", "label"], lambda i: [f"digit_{i:04d}", f"images/{i:04d}.png", labels[i]])
    write("val.csv", val_idx, ["id", "image", "label"], lambda i: [f"digit_{i:04d}", f"images/{i:04d}.png", labels[i]])
    write("info.csv", test_idx, ["id", "image"], lambda i: [f"digit_{i:04d}", f"images/{i:04d}.png"])
    write("test_labels.csv", test_idx, ["id", "label"], lambda i: [f"digit_{i:04d}", labels[i]])
    (tmp / DIGITS_MARKER).write_text("scikit-learn digits, stratified 70/15/15 split, seed 0\n")
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process finished first (the target now exists) or `root` holds something else.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / DIGITS_MARKER).is_file():
            raise DataError(f"cannot write the digits data set to {root}: the directory exists and is not a complete digits set") from None
