"""Data: the embedded digits, CSV and folder sources, their errors, transforms and the balanced sampler."""
import csv
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from dist_train.config import DataConfig, load_config
from dist_train.data.datasets import ImageDataset, build_transform
from dist_train.data.loaders import ClassBalancedSampler
from dist_train.data.digits import materialize_digits
from dist_train.data.splits import load_test_records
from dist_train.data.tables import read_csv, sorted_labels
from dist_train.errors import ConfigError, DataError
from dist_train.models.tasks import load_records


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_digits_split_is_fixed_disjoint_and_complete(digits_root):
    train, val, test = rows(digits_root / "train.csv"), rows(digits_root / "val.csv"), rows(digits_root / "info.csv")
    assert (len(train), len(val), len(test)) == (1257, 270, 270)
    ids = [r["id"] for r in train + val + test]
    assert len(set(ids)) == 1797
    assert "label" not in test[0]  # the test table has no labels; the answers live apart
    assert [r["id"] for r in rows(digits_root / "test_labels.csv")] == [r["id"] for r in test]
    assert Counter(r["label"] for r in val).keys() == {str(d) for d in range(10)}
    image = Image.open(digits_root / train[0]["image"])
    assert image.size == (8, 8) and image.mode == "L"
    # the pixels are sklearn's digits scaled from 0..16 to 0..255
    from sklearn.datasets import load_digits
    index = int(train[0]["id"].split("_")[1])
    assert np.array_equal(np.asarray(image), (load_digits().images[index] * 255 / 16).round().astype(np.uint8))


def test_digits_materialize_is_idempotent(digits_root):
    before = (digits_root / "train.csv").stat().st_mtime_ns
    materialize_digits(digits_root)
    assert (digits_root / "train.csv").stat().st_mtime_ns == before


def test_digits_refuses_foreign_directory(tmp_path):
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "mine.txt").write_text("x")
    with pytest.raises(DataError, match="not a complete digits set"):
        materialize_digits(tmp_path / "digits")


def test_load_records_digits(digits_root):
    train, val, classes = load_records(DataConfig(root=str(digits_root)), seed=0)
    assert classes == [str(d) for d in range(10)]
    assert len(train.paths) == 1257 and len(val.paths) == 270
    assert set(train.targets.tolist()) == set(range(10))
    test = load_test_records(DataConfig(root=str(digits_root)))
    assert len(test.ids) == 270 and set(test.targets.tolist()) == {-1}


def make_csv_dataset(tmp_path, labels, header=("id", "image", "label")):
    (tmp_path / "img").mkdir()
    with open(tmp_path / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, label in enumerate(labels):
            Image.new("RGB", (5, 4), (i * 20, 0, 0)).save(tmp_path / "img" / f"{i}.png")
            writer.writerow([f"s{i}", f"img/{i}.png", label])
    return DataConfig(source="csv", root=str(tmp_path), train="train.csv", val=None, test=None, val_fraction=0.25,
                      image_size=6, channels=3, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])


def test_csv_source_with_holdout_and_string_labels(tmp_path):
    cfg = make_csv_dataset(tmp_path, ["cat", "dog"] * 8)
    train, val, classes = load_records(cfg, seed=1)
    assert classes == ["cat", "dog"]
    assert len(train.paths) == 12 and len(val.paths) == 4
    assert sorted(Counter(val.targets.tolist()).values()) == [2, 2]  # stratified
    assert not set(train.ids) & set(val.ids)
    image, target, index = ImageDataset(train, build_transform(cfg, train=False), 3)[0]
    assert image.shape == (3, 6, 6) and image.dtype == torch.float32 and index == 0


def test_csv_missing_column_lists_columns_found(tmp_path):
    cfg = make_csv_dataset(tmp_path, ["a", "b"], header=("id", "image", "class"))
    with pytest.raises(DataError, match=r"missing column 'label'.*columns found: id, image, class"):
        load_records(cfg, seed=0)


def test_csv_missing_image_names_file(tmp_path):
    cfg = make_csv_dataset(tmp_path, ["a", "b", "a", "b"])
    (tmp_path / "img" / "2.png").unlink()
    with pytest.raises(DataError, match=r"image file not found: .*img/2.png"):
        load_records(cfg, seed=0)


def test_label_outside_classes_names_row_and_label(tmp_path):
    cfg = make_csv_dataset(tmp_path, ["a", "b", "zebra", "a"])
    cfg.classes = ["a", "b"]
    with pytest.raises(DataError, match=r"row 3 has label 'zebra', which is not one of the 2 classes \(a, b\)"):
        load_records(cfg, seed=0)


def test_missing_csv_file(tmp_path):
    with pytest.raises(DataError, match="CSV file not found"):
        read_csv(tmp_path / "none.csv", ["image"])


def test_folder_source(tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        for cls in ("ants", "bees"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("L", (7, 7)).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "test").mkdir()
    for name in ("b.jpg", "a.png"):
        Image.new("RGB", (9, 9)).save(tmp_path / "test" / name)
    cfg = DataConfig(source="folder", root=str(tmp_path), train="train", val="val", test="test")
    train, val, classes = load_records(cfg, seed=0)
    assert classes == ["ants", "bees"] and train.targets.tolist() == [0, 0, 0, 1, 1, 1] and val.targets.tolist() == [0, 1]
    assert load_test_records(cfg).ids == ["a", "b"]


def test_numeric_labels_sort_numerically():
    assert sorted_labels(["10", "9", "1"]) == ["1", "9", "10"]
    assert sorted_labels(["b", "a"]) == ["a", "b"]


def test_augmentation_from_config_and_unknown_name():
    cfg = load_config(None, ["data.train_augment=[{name: RandomHorizontalFlip, p: 1.0}]", "data.image_size=4"]).data
    image = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 10).convert("RGB")
    flipped, plain = build_transform(cfg, train=True)(image), build_transform(cfg, train=False)(image)
    assert torch.equal(flipped, plain.flip(-1))
    cfg.train_augment = [{"name": "RandomFlipp"}]
    with pytest.raises(ConfigError, match="did you mean Random"):
        build_transform(cfg, train=True)


def test_class_balanced_sampler_is_balanced_and_seeded():
    targets = [0] * 90 + [1] * 10
    sampler = ClassBalancedSampler(targets, seed=3)
    draws = list(sampler)
    counts = Counter(targets[i] for i in draws)
    assert len(draws) == 100 and 35 <= counts[1] <= 65
    assert draws == list(ClassBalancedSampler(targets, seed=3))  # every rank draws the same sequence
    sampler.set_epoch(1)
    assert list(sampler) != draws
