"""Small synthetic image sets for the tasks beyond single-label classification (offline, seeded, seconds to write).

    python -m dist_train.synthetic attributes data/attributes   # mask x gender x age, 18 combined classes
    python -m dist_train.synthetic regression data/brightness   # a number per image
    python -m dist_train.synthetic ranking data/ranking         # queries of images with a relevance each

Each writes PNGs under <root>/images, train.csv, val.csv, info.csv (test: id + image) and test_labels.csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

MASK = ["wear", "incorrect", "not_wear"]
GENDER = ["male", "female"]
AGE = ["young", "middle", "old"]
MARKER = ".complete"


def attribute_image(mask: int, gender: int, age: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """Background colour = gender, a white block's height = mask, a green stripe's length = age; plus noise."""
    image = np.zeros((size, size, 3), dtype=np.float32)
    image[:] = (60, 60, 160) if gender == 0 else (160, 60, 60)
    height = {0: 6, 1: 3, 2: 0}[mask]
    if height:
        image[size - 2 - height:size - 2, size // 4: 3 * size // 4] = 235
    image[1:3, 1:1 + 4 * (age + 1)] = (40, 220, 40)
    image += rng.normal(0, 70, image.shape)
    return image.clip(0, 255).astype(np.uint8)


def _write(root: Path, rows: dict[str, list[dict]], draw, seed: int) -> Path:
    """rows: split -> dicts with `id` and labels; draw(row, rng) -> HxWx3 uint8. Written atomically."""
    if (root / MARKER).is_file():
        return root
    rng = np.random.default_rng(seed)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    for split, items in rows.items():
        for row in items:
            Image.fromarray(draw(row, rng)).save(tmp / "images" / f"{row['id']}.png")
            row["image"] = f"images/{row['id']}.png"
        columns = ["id", "image"] if split == "info" else ["id", "image", *[k for k in items[0] if k not in ("id", "image")]]
        with open(tmp / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(items)
        if split == "info":
            with open(tmp / "test_labels.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=[k for k in items[0] if k != "image"])
                writer.writeheader()
                writer.writerows({k: v for k, v in r.items() if k != "image"} for r in items)
    (tmp / MARKER).write_text("dist_train.synthetic\n")
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, root)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _splits(count: int, make, rng: np.random.Generator) -> dict[str, list[dict]]:
    """70/15/15 of `count` rows made by make(i, rng)."""
    rows = [make(i, rng) for i in range(count)]
    a, b = int(0.7 * count), int(0.85 * count)
    return {"train": rows[:a], "val": rows[a:b], "info": rows[b:]}


def write_attributes(root: str | Path, count: int = 1800, seed: int = 0) -> Path:
    """Images with three attributes: mask (3), gender (2), age band (3): 18 combined classes."""
    rng = np.random.default_rng(seed)

    def make(i, rng):
        return {"id": f"p{i:05d}", "mask": MASK[rng.integers(3)], "gender": GENDER[rng.integers(2)], "age": AGE[rng.integers(3)]}

    def draw(row, rng):
        return attribute_image(MASK.index(row["mask"]), GENDER.index(row["gender"]), AGE.index(row["age"]), rng)

    return _write(Path(root), _splits(count, make, rng), draw, seed + 1)


def write_regression(root: str | Path, count: int = 600, seed: int = 0) -> Path:
    """Grey images whose brightness is the target (`value`, 0-10) and the size of a bright square a second (`size`)."""
    rng = np.random.default_rng(seed)

    def make(i, rng):
        return {"id": f"r{i:05d}", "value": f"{rng.uniform(0, 10):.3f}", "size": str(int(rng.integers(2, 9)))}

    def draw(row, rng):
        image = np.full((16, 16, 3), 20 + 20 * float(row["value"]), dtype=np.float32)
        s = int(row["size"])
        image[8 - s // 2: 8 - s // 2 + s, 8 - s // 2: 8 - s // 2 + s] = 250
        return (image + rng.normal(0, 4, image.shape)).clip(0, 255).astype(np.uint8)

    return _write(Path(root), _splits(count, make, rng), draw, seed + 1)


def write_ranking(root: str | Path, queries: int = 60, per_query: int = 8, seed: int = 0) -> Path:
    """Queries of `per_query` images each; relevance 0-3 shows as the brightness of a centre block."""
    rng = np.random.default_rng(seed)
    rows = {"train": [], "val": [], "info": []}
    for q in range(queries):
        split = "train" if q < 0.7 * queries else "val" if q < 0.85 * queries else "info"
        for j in range(per_query):
            rows[split].append({"id": f"q{q:03d}_{j}", "query": f"q{q:03d}", "relevance": str(int(rng.integers(4)))})

    def draw(row, rng):
        image = np.full((16, 16, 3), 40, dtype=np.float32)
        image[4:12, 4:12] = 60 + 60 * int(row["relevance"])
        return (image + rng.normal(0, 25, image.shape)).clip(0, 255).astype(np.uint8)

    return _write(Path(root), rows, draw, seed + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["attributes", "regression", "ranking"])
    parser.add_argument("root")
    args = parser.parse_args()
    writer = {"attributes": write_attributes, "regression": write_regression, "ranking": write_ranking}[args.kind]
    print(f"wrote {writer(args.root)}")


if __name__ == "__main__":
    main()
