"""A synthetic image data set of photo-like JPEGs, for throughput benchmarks: decoding is what costs.

    python bench/make_jpegs.py OUT --count 20000 --classes 100 --size 500x375

Each image is a smooth random colour field plus texture and sensor-like noise, so that it compresses
and decodes like a photograph (about 70 KB at 500x375, quality 90; Pillow decodes one in about 1.3 ms
on one core of the 2-core dev machine). Sizes vary by +-15% around --size. Written as OUT/train/<class>/<n>.jpg with OUT/train.csv (id, image,
label) and OUT/val.csv (the first --val images, also in train); the folder layout is what timm reads.
"""
from __future__ import annotations

import argparse
import csv
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

COMPLETE = ".complete"


def _image(index: int, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng((seed, index))
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    texture = np.asarray(Image.fromarray(rng.integers(0, 256, size=(height // 3, width // 3, 3), dtype=np.uint8))
                         .resize((width, height), Image.BILINEAR), dtype=np.float32)
    pixels = 0.75 * field + 0.25 * texture + rng.normal(0.0, 8.0, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write(job: tuple) -> tuple[str, int]:
    index, label, (width, height), out, seed, quality = job
    rng = np.random.default_rng((seed, index, 1))
    w = int(width * rng.uniform(0.85, 1.15))
    h = int(height * rng.uniform(0.85, 1.15))
    relative = f"train/{label:03d}/{index:06d}.jpg"
    _image(index, w, h, seed).save(out / relative, quality=quality)
    return relative, label


def make(out: Path, count: int, classes: int, size: tuple[int, int], val: int = 512, quality: int = 90,
         seed: int = 0, workers: int | None = None) -> Path:
    """Writes the data set once (skipped when OUT holds a complete one of the same shape); returns OUT."""
    stamp = f"{count} {classes} {size[0]}x{size[1]} {quality} {seed}\n"
    if (out / COMPLETE).is_file() and (out / COMPLETE).read_text() == stamp:
        return out
    for label in range(classes):
        (out / "train" / f"{label:03d}").mkdir(parents=True, exist_ok=True)
    jobs = [(i, i % classes, size, out, seed, quality) for i in range(count)]
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        rows = list(pool.map(_write, jobs, chunksize=64))
    for name, subset in (("train.csv", rows), ("val.csv", rows[:val])):
        with open(out / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "image", "label"])
            writer.writerows([Path(path).stem, path, label] for path, label in subset)
    (out / COMPLETE).write_text(stamp)
    return out


def parse_size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--size", type=parse_size, default=(500, 375), help="WIDTHxHEIGHT (default 500x375)")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--workers", type=int, help="processes writing images (default: one per core)")
    args = parser.parse_args()
    make(args.out, args.count, args.classes, args.size, quality=args.quality, workers=args.workers)
    total = sum(p.stat().st_size for p in (args.out / "train").rglob("*.jpg"))
    print(f"{args.count} JPEGs, {total / args.count / 1024:.0f} KB on average, in {args.out}")


if __name__ == "__main__":
    main()
