"""dist_train.Trainer and the config's file hooks: your model, loss and datasets in the loop of train.py."""
from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch
import yaml
from conftest import config_path, read_jsonl, run_cli, tiny_overrides
from torch import nn
from user_parts import DigitsCSV, TinyNet

from dist_train import Trainer
from dist_train.commands.cli import predict_main, train_main
from dist_train.config import Config, load_config
from dist_train.errors import ConfigError
from dist_train.rundir.weights import state_digest

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
    torch.manual_seed(0)  # the model is built before the Trainer seeds: not from whatever the worker's last test left
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
    proc = run_cli("tests/trainer_script.py", [config_path("digits.yaml"), *tiny_overrides(digits_root, api)], processes=2)
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


# ----------------------------------------------------------------------------------------------
# model.file, loss.file, data.file

MODEL_FILE = '''
from torch import nn


def build_model(cfg, num_classes, in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, cfg.width), nn.ReLU(),
                         nn.Linear(cfg.width, num_classes))
'''

LOSS_FILE = '''
from torch import nn


def build_loss(cfg, num_classes):
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)  # dist_train sets its reduction to "none"
'''

DATA_FILE = '''
"""The digits tables through dist_train's own dataset class: items (image, target, index)."""
from dist_train.data import build_dataset as built_in, load_test_records
from dist_train.tasks import load_records


def build_dataset(cfg, split):
    if split == "test":
        records = load_test_records(cfg)
        dataset = built_in(records, cfg, split, seed=0)
        dataset.ids = records.ids
        return dataset
    train, val, classes = load_records(cfg, seed=0)
    dataset = built_in(train if split == "train" else val, cfg, split, seed=0)
    dataset.classes = classes
    return dataset
'''


def write_project(directory, files: dict[str, str], sections: dict) -> str:
    """The shipped digits config plus `sections`, written with `files` into `directory`; returns the config's path."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    config = yaml.safe_load(open(config_path("digits.yaml")))
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return str(directory / "config.yaml")


def error_line(main, argv, capsys) -> str:
    """The one line train.py / predict.py print for bad input (exit code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert len(errors) == 1, errors
    return errors[0][errors[0].index("error: "):]  # (after a progress bar's last redraw, if any)


def test_model_loss_and_data_files_named_in_the_config(digits_root, tmp_path, capsys):
    project = tmp_path / "project"
    files = {"model.py": MODEL_FILE, "loss.py": LOSS_FILE, "data.py": DATA_FILE}
    config = write_project(project, files, {"model": {"file": "model.py", "width": 16, "freeze": ["3."]},
                                            "loss": {"file": "loss.py"}, "data": {"file": "data.py"}})
    loaded = load_config(config)  # relative to the config file's directory, not the working directory
    assert (loaded.model.file, loaded.loss.file, loaded.data.file) == tuple(str(project / f) for f in files)

    run = tmp_path / "run"  # loader workers: a data.file dataset starts them by fork (its module has no importable name)
    assert train_main(["--config", config, *tiny_overrides(digits_root, run, **{"data.num_workers": 2})]) == 0
    info = json.loads((run / "run_info.json").read_text())
    # model.freeze applies to the file's model: its last layer (16 -> 10) is frozen
    assert info["parameters"] == {"trainable": 64 * 16 + 16, "frozen": 16 * 10 + 10}
    assert (info["train_samples"], info["val_samples"], info["classes"]) == (TRAIN, VAL, DIGITS)
    assert "Sequential: 1,040 trainable, 170 frozen parameters" in capsys.readouterr().out
    assert info["best"]["value"] > 0.3  # learning (10 classes: chance is 0.1)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["file"] == str(project / "model.py")  # absolute: the run's config works from anywhere

    assert predict_main(["--config", str(run / "config.yaml"), "--checkpoint", str(run / "checkpoints" / "best")]) == 0
    rows = read_rows(run / "submission.csv")
    assert [r["id"] for r in rows] == [r["id"] for r in read_rows(digits_root / "info.csv")]
    assert {r["label"] for r in rows} <= set(DIGITS)


def test_debug_describes_and_runs_the_files(digits_root, tmp_path, capsys):
    config = write_project(tmp_path / "project", {"model.py": MODEL_FILE, "data.py": DATA_FILE},
                           {"model": {"file": "model.py", "width": 16}, "data": {"file": "data.py"}})
    assert train_main(["--config", config, f"data.root={digits_root}", f"output_dir={tmp_path / 'run'}", "--debug"]) == 0
    out = capsys.readouterr().out
    assert "model      Sequential (model.file): 4,282 parameters (4,282 trainable, 0 frozen)" in out
    assert "data       data.file data.py: 1,257 training / 270 validation images, 10 classes, input 1x16x16" in out
    assert read_jsonl(tmp_path / "run" / "debug" / "metrics.jsonl")[0]["rank_batches"] == [4]
    assert len(read_rows(tmp_path / "run" / "debug" / "submission.csv")) == 64


NOT_PER_SAMPLE = '''
import torch.nn.functional as F


def build_loss(cfg, num_classes):
    return lambda logits, targets: F.cross_entropy(logits, targets)  # a mean: one number per batch
'''
DICT_ITEMS = '''
def build_dataset(cfg, split):
    return [{"image": None, "label": 0}] * 100
'''


@pytest.mark.parametrize("files, sections, expected", [
    ({}, {"model": {"file": "model.py"}}, "error: model.file: file not found: {dir}/model.py"),
    ({"model.py": "width = 3\n"}, {"model": {"file": "model.py"}},
     "error: model.file: {dir}/model.py defines no function build_model() (expected: build_model(cfg: ModelConfig, "
     "num_classes: int, in_channels: int, image_size: int) -> nn.Module)"),
    ({"model.py": "def build_model(cfg, num_classes, in_channels, image_size):\n    return 'resnet18'\n"},
     {"model": {"file": "model.py"}}, "error: model.file {dir}/model.py: build_model(...) (str) is not a torch.nn.Module"),
    ({"loss.py": NOT_PER_SAMPLE}, {"loss": {"file": "loss.py"}},
     "error: loss.file {dir}/loss.py: build_loss(...) returned () for a batch of 32; it must return one loss per sample, "
     "shape (32,) (reduction='none')"),
    ({"data.py": "def build_datasets(cfg, split):\n    pass\n"}, {"data": {"file": "data.py"}},
     "error: data.file: {dir}/data.py defines no function build_dataset() (expected: build_dataset(cfg: DataConfig, "
     "split: str) -> Dataset, split in train/val/test)"),
    ({"data.py": DICT_ITEMS}, {"data": {"file": "data.py"}},
     "error: the train dataset (list) has no `classes` attribute: give it one (a list of class names) or set model.num_classes"),
    ({"data.py": DICT_ITEMS}, {"data": {"file": "data.py"}, "model": {"num_classes": 10}},
     "error: train dataset list: item N is a dict; expected (image tensor, target), (image, target, index) or, for test, "
     "an image tensor"),
])
def test_bad_files_are_one_line_naming_the_key_and_the_file(digits_root, tmp_path, capsys, files, sections, expected):
    config = write_project(tmp_path / "p", files, sections)
    line = error_line(train_main, ["--config", config, *tiny_overrides(digits_root, tmp_path / "run")], capsys)
    assert re.sub(r"item \d+", "item N", line) == expected.format(dir=tmp_path / "p")  # (items come shuffled)


# ----------------------------------------------------------------------------------------------
# Trainer's config and refusals


def test_trainer_config_from_a_file_a_dict_a_config_or_the_defaults(tmp_path, monkeypatch):
    assert Trainer().config == load_config(None)
    from_file = Trainer(config_path("digits.yaml"), seed=7, **{"optim.lr": 0.01, "data.train_augment": []})
    assert (from_file.config.seed, from_file.config.optim.lr, from_file.config.data.image_size) == (7, 0.01, 16)
    assert from_file.config.data.train_augment == []
    from_dict = Trainer({"optim": {"lr": "3e-4"}, "train": {"epochs": 3}}, **{"data.batch_size": 8})
    assert (from_dict.config.optim.lr, from_dict.config.train.epochs, from_dict.config.data.batch_size) == (3e-4, 3, 8)
    config = Config()
    assert Trainer(config, seed=3).config.seed == 3 and config.seed == 42  # the Config given is left as it was
    with pytest.raises(ConfigError, match=r"^unknown config key optim\.lrr; did you mean optim\.lr\?$"):
        Trainer(**{"optim.lrr": 1})
    with pytest.raises(ConfigError, match=r"^optim\.lr: expected float, got str 'fast'$"):
        Trainer(**{"optim.lr": "fast"})
    with pytest.raises(TypeError, match="config must be a Config, a dict, a YAML/JSON path or None"):
        Trainer(42)
    monkeypatch.chdir(tmp_path)  # no config file: a relative *.file is relative to the working directory
    (tmp_path / "net.py").write_text(MODEL_FILE)
    assert Trainer({"model": {"file": "net.py"}}).config.model.file == str(tmp_path / "net.py")


class Unnamed(DigitsCSV):
    """No `classes` attribute."""

    def __init__(self, root, table):
        super().__init__(root, table)
        del self.classes


@pytest.mark.parametrize("given, overrides, message", [
    ({"train_dataset": "train"}, {}, "a train dataset was given but no val dataset: give both, or set data.file"),
    ({"train_dataset": "train", "val_dataset": "val"}, {"data.balanced_sampler": True},
     "data.balanced_sampler draws by the built-in dataset's targets; with your own dataset"),
    ({"train_dataset": "train", "val_dataset": "val"}, {"data.decode": "device"},
     "data.decode=device decodes the built-in dataset's JPEG files; with your own dataset"),
    ({"train_dataset": "unnamed", "val_dataset": "val"}, {},
     "the train dataset (Unnamed) has no `classes` attribute: give it one (a list of class names) or set model.num_classes"),
    ({"model": "tiny", "train_dataset": "train", "val_dataset": "val"}, {"model.num_classes": 3},
     "model.num_classes=3 but the data has 10 classes"),
    ({"train_dataset": "list", "val_dataset": "val"}, {"model.num_classes": 10},
     "the train dataset given (int) is not a map-style Dataset (__getitem__ and __len__)"),
])
def test_trainer_refuses_what_cannot_work_before_training(digits_root, tmp_path, given, overrides, message):
    objects = {"train": DigitsCSV(digits_root, "train.csv"), "val": DigitsCSV(digits_root, "val.csv"),
               "unnamed": Unnamed(digits_root, "train.csv"), "tiny": TinyNet(), "list": 7}
    trainer = Trainer(config_path("digits.yaml"), **{k: objects[v] for k, v in given.items()},
                      **tiny(digits_root, tmp_path), **overrides)
    with pytest.raises(ConfigError) as error:
        trainer.fit()
    assert str(error.value).startswith(message)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_a_dataset_without_classes_uses_model_num_classes(digits_root, tmp_path):
    """No `classes` attribute: model.num_classes names them 0..N-1; items may be (image, target, index)."""
    train = Unnamed(digits_root, "train.csv")
    triples = [(*train[i], i) for i in range(64)]
    trainer = Trainer(config_path("digits.yaml"), model=TinyNet(), train_dataset=triples, val_dataset=triples,
                      **tiny(digits_root, tmp_path, **{"model.num_classes": 10, "train.epochs": 1}))
    summary = trainer.fit()
    assert summary["classes"] == DIGITS and summary["train_samples"] == 64 and summary["global_step"] == 2
