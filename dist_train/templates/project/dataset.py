"""The data: build_dataset returns a torch Dataset for split "train", "val" or "test" (config.yaml's data section).

This one reads a CSV table per split -- columns image (a path relative to data.root) and label; the test
table has id and image -- like dist_train's built-in csv source. Change it to read anything: the loop needs
dataset[i] -> (image tensor of shape (channels, image_size, image_size), class index), for test the image alone,
len(dataset), and optionally `classes` (train: the class names, index = class index) and `ids` (test: the
submission's first column).
"""
import csv
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

HERE = Path(__file__).parent


class CsvImages(Dataset):
    def __init__(self, cfg, table: str, classes: list[str], labelled: bool):
        root = HERE / cfg.root  # an absolute data.root stays as it is
        with open(root / table, newline="") as f:
            rows = list(csv.DictReader(f))
        self.paths = [root / row[cfg.image_column] for row in rows]
        self.ids = [row.get(cfg.id_column, str(i)) for i, row in enumerate(rows)]
        self.classes = classes
        self.targets = [classes.index(row[cfg.label_column]) for row in rows] if labelled else None
        self.mode = "L" if cfg.channels == 1 else "RGB"
        self.transform = v2.Compose([
            v2.ToImage(),
            v2.Resize((cfg.image_size, cfg.image_size), antialias=True),
            # training-only augmentation would go here, e.g. v2.RandomAffine(degrees=10) when labelled
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(cfg.mean, cfg.std),
        ])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with Image.open(self.paths[index]) as image:
            image = self.transform(image.convert(self.mode))
        return image if self.targets is None else (image, self.targets[index])


def class_names(cfg) -> list[str]:
    """data.classes, else the labels of the training table, sorted (numerically when they are numbers)."""
    if cfg.classes:
        return list(cfg.classes)
    with open(HERE / cfg.root / cfg.train, newline="") as f:
        labels = {row[cfg.label_column] for row in csv.DictReader(f)}
    numeric = all(label.lstrip("-").isdigit() for label in labels)
    return sorted(labels, key=int) if numeric else sorted(labels)


def build_dataset(cfg, split: str) -> Dataset:
    table = {"train": cfg.train, "val": cfg.val, "test": cfg.test}[split]
    return CsvImages(cfg, table, class_names(cfg), labelled=split != "test")
