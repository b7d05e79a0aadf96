"""dist_train.Trainer and the config's file hooks: your model, loss and datasets in the loop of train.py."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import yaml
from torch import nn

from conftest import ROOT, config_path, read_jsonl, run_cli, tiny_overrides
from dist_train import Trainer
from dist_train.checkpoint import state_digest
from dist_train.cli import predict_main, train_main
from dist_train.config import Config, load_config
from dist_train.errors import ConfigError
from user_parts import DigitsCSV, TinyNet

TRAIN, VAL, TEST = 1257, 270, 270  # the digits' splits
DIGITS = [str(d) for d in range(10)]


def tiny(digits_root, out, **extra) -> dict:
    """conftest's fast digits run as Trainer overrides (Python values)."""
    pairs = (text.split("=", 1) for text in tiny_overrides(digits_root, out, **extra))
    return {key: yaml.safe_load(value) for key, value in pairs}


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fit_and_predict_in_one_process_with_a_user_model_dataset_and_loss(digits_root, tmp_path):
    model, loss = TinyNet(), nn.CrossEntropyLoss()
    trainer = Trainer(config_path("digits.yaml"), model=model, loss=loss, train_dataset=DigitsCSV(digits_root, "train.csv"),
                      val_dataset=DigitsCSV(digits_root, "val.csv"), **tiny(digits_root, tmp_path))
    summary = trainer.fit()

    assert loss.reduction == "none"  # the loop averages per-sample losses itself
    assert summary["num_processes"] == 1 and summary["distributed_type"] == "DistributedType.NO"
    assert summary["epochs_completed"] == 2 and summary["global_step"] == 2 * math.ceil(TRAIN / 32)
    assert (summary["train_samples"], summary["val_samples"]) == (TRAIN, VAL)
    assert summary["classes"] == DIGITS
    assert summary["parameters"] == {"trainable": 64 * 32 + 32 + 32 * 10 + 10, "frozen": 0}
    assert summary["best"]["value"] > 0.8
    # the object given is the one that trained, and the run's last checkpoint holds it
    assert state_digest(model.state_dict()) == summary["final_weights_sha256_per_rank"][0]
    assert json.loads((tmp_path / "checkpoints" / "best" / "classes.json").read_text()) == DIGITS
    assert [m["rank_samples"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == [[TRAIN], [TRAIN]]

    test = DigitsCSV(digits_root, "info.csv", labelled=False)  # images alone, with an `ids` attribute
    path = trainer.predict(dataset=test)
    assert path == tmp_path / "submission.csv"
    rows = read_rows(path)
    assert [r["id"] for r in rows] == test.ids  # one row per image, in the dataset's order
    truth = {r["id"]: r["label"] for r in read_rows(digits_root / "test_labels.csv")}
    assert sum(r["label"] == truth[r["id"]] for r in rows) / TEST > 0.8

    # split="val": this Trainer's val_dataset and loss, scored by the best checkpoint: the best epoch's numbers
    val = trainer.predict(split="val", output=tmp_path / "val.csv")
    metrics = json.loads(val.with_suffix(".metrics.json").read_text())
    assert metrics["val_samples"] == VAL and metrics["val_accuracy"] == pytest.approx(summary["best"]["value"])
    best = read_jsonl(tmp_path / "metrics.jsonl")[summary["best"]["epoch"] - 1]
    assert metrics["val_loss"] == pytest.approx(best["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_trainer_script_on_two_processes_is_the_cli_run(digits_root, tmp_path):
    """The same config through train.py and through a Trainer script with plain-torch equivalents of the
    built-in parts, each on 2 processes: the same shards, the same weights on every rank, the same submission."""
    cli, api = tmp_path / "cli", tmp_path / "api"
    run_cli("train.py", ["--config", config_path("digits.yaml"), *tiny_overrides(digits_root, cli)], processes=2)
    proc = run_cli("tests/trainer_script.py", [config_path("digits.yaml"), *tiny_overrides(digits_root, api)], processes=2,
                   env={"PYTHONPATH": str(ROOT)})
    assert "rank 0: trained 40 steps" in proc.stdout and "rank 1: trained 40 steps" in proc.stdout

    cli_info, api_info = (json.loads((d / "run_info.json").read_text()) for d in (cli, api))
    assert api_info["num_processes"] == 2 and api_info["distributed_type"] == "DistributedType.MULTI_CPU"
    digests = api_info["final_weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert digests == cli_info["final_weights_sha256_per_rank"]
    for cli_epoch, api_epoch in zip(read_jsonl(cli / "metrics.jsonl"), read_jsonl(api / "metrics.jsonl"), strict=True):
        assert api_epoch["rank_batches"] == cli_epoch["rank_batches"] == [20, 20]
        assert api_epoch["rank_samples"] == cli_epoch["rank_samples"] == [640, 640]
        assert api_epoch["val_accuracy"] == cli_epoch["val_accuracy"] and api_epoch["val_loss"] == cli_epoch["val_loss"]

    # what each rank loaded: half of each epoch, together all of it (the last batch padded with repeats)
    seen = [json.loads((api / f"seen-rank{rank}.json").read_text()) for rank in (0, 1)]
    for epoch in (0, 1):
        shards = [[i for e, i in ranks if e == epoch] for ranks in seen]
        assert [len(s) for s in shards] == [640, 640]
        assert set(shards[0]) | set(shards[1]) == set(range(TRAIN))
        assert len(set(shards[0]) & set(shards[1])) == 2 * 640 - TRAIN

    # Trainer.predict on 2 processes writes what predict.py writes from the same checkpoint
    assert predict_main(["--config", config_path("digits.yaml"), *tiny_overrides(digits_root, cli),
                         "--checkpoint", str(cli / "checkpoints" / "best")]) == 0
    assert (api / "submission.csv").read_bytes() == (cli / "submission.csv").read_bytes()
