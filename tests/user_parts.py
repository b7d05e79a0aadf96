"""A user's own parts, written with plain torch: a network, a dataset reading the digits' CSV tables, and a
wrapper that records which samples a rank loads. Used by tests/test_api.py and tests/trainer_script.py."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset


class TinyNet(nn.Module):
    """Flatten, one hidden layer: for 1x8x8 images."""

    def __init__(self, num_classes: int = 10, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsCSV(Dataset):
    """One table of the digits (materialize_digits): (image, class index) items, or the image alone when unlabelled."""

    def __init__(self, root: Path, table: str, labelled: bool = True):
        with open(Path(root) / table, newline="") as f:
            rows = list(csv.DictReader(f))
        self.paths = [Path(root) / row["image"] for row in rows]
        self.ids = [row["id"] for row in rows]
        self.classes = [str(d) for d in range(10)]
        self.targets = [self.classes.index(row["label"]) for row in rows] if labelled else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        image = (torch.from_numpy(pixels)[None] - 0.5) / 0.5
        return image if self.targets is None else (image, self.targets[index])


class Recorded(Dataset):
    """(image, target) items of a dist_train dataset, recording the (epoch, index) pairs this process loads."""

    def __init__(self, inner, classes: list[str] | None = None, ids: list[str] | None = None):
        self.inner, self.classes, self.ids = inner, classes, ids
        self.epoch, self.seen = 0, []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        self.seen.append((self.epoch, index))
        image, target, _ = self.inner[index]
        return image, target
