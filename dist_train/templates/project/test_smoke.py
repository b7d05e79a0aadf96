"""Smoke test: model.py, dataset.py and loss.py train for two short epochs and predict, in dist_train's own loop.

It runs on a slice of scikit-learn's digits written to a temporary directory, whatever data.root says, so it
stays a few seconds long. Run it with `pytest {name}`.
"""
import csv
import math
from pathlib import Path

from dist_train import Trainer
from dist_train.data.digits import materialize_digits

HERE = Path(__file__).parent


def head(source: Path, target: Path, rows: int) -> None:
    with open(source, newline="") as f:
        lines = list(csv.reader(f))
    with open(target, "w", newline="") as f:
        csv.writer(f).writerows(lines[:rows + 1])


def test_trains_two_epochs_and_predicts(tmp_path):
    data = tmp_path / "digits"
    materialize_digits(data)
    head(data / "train.csv", data / "train_head.csv", 96)
    head(data / "val.csv", data / "val_head.csv", 40)
    head(data / "info.csv", data / "test_head.csv", 30)
    trainer = Trainer(HERE / "config.yaml", output_dir=str(tmp_path / "run"), **{
        "data.root": str(data), "data.train": "train_head.csv", "data.val": "val_head.csv", "data.test": "test_head.csv",
        "data.num_workers": 0, "train.epochs": 2})

    summary = trainer.fit()
    batch = trainer.config.data.batch_size
    assert summary["epochs_completed"] == 2 and summary["global_step"] == 2 * math.ceil(96 / batch)
    assert summary["train_samples"] == 96 and summary["val_samples"] == 40
    assert math.isfinite(summary["best"]["value"])
    assert (tmp_path / "run" / "checkpoints" / "best" / "model.safetensors").is_file()

    submission = trainer.predict()
    with open(submission, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(data / "test_head.csv", newline="") as f:
        assert [row["id"] for row in rows] == [row["id"] for row in csv.DictReader(f)]
    assert {row["label"] for row in rows} <= set(summary["classes"])
