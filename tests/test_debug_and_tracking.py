"""`python train.py --debug`, W&B in offline mode, progress bars on the main process only."""
from __future__ import annotations

import csv
import json
import os
import re
import struct

import pytest
from conftest import config_path, read_jsonl, run_cli, tiny_overrides

from dist_train.rundir import report
from dist_train.rundir.report import progress


def debug_args(digits_root, out, **extra):
    return ["--config", config_path("digits.yaml"), f"data.root={digits_root}", f"output_dir={out}", "--debug",
            *[f"{k}={v}" for k, v in extra.items()]]


def test_debug_prints_the_real_run_overfits_one_batch_and_runs_a_few_batches(digits_root, tmp_path):
    proc = run_cli("train.py", debug_args(digits_root, tmp_path))
    out = proc.stdout
    assert "model      small_cnn: 94,186 parameters (94,186 trainable, 0 frozen), 0.36 MB of weights" in out
    assert "data       digits: 1,257 training / 270 validation images, 10 classes, input 1x16x16" in out
    assert "batch      32 per process x 1 accumulation = 32 per optimizer step on 1 process" in out
    assert "steps      40 optimizer steps/epoch x 15 epochs = 600 steps (1 process); cosine schedule, warm-up 1 epoch(s)" in out
    assert "LR preview step 1: 1.04e-04 | step 40: 3.00e-03 |" in out and "step 600: 0.00e+00" in out
    assert "debug: overfit one batch (32 images, 50 steps of adamw at lr 0.003): loss" in out
    run = tmp_path / "debug"
    assert read_jsonl(run / "metrics.jsonl")[0]["rank_batches"] == [4]  # a few batches, through the real loop
    assert json.loads((run / "run_info.json").read_text())["num_processes"] == 1
    with open(run / "submission.csv") as f:
        assert len(list(csv.DictReader(f))) == 64  # 2 prediction batches
    assert not (tmp_path / "checkpoints").exists()  # the real run directory is left alone


def test_debug_fails_loudly_when_one_batch_cannot_be_learned(digits_root, tmp_path):
    proc = run_cli("train.py", debug_args(digits_root, tmp_path, **{"optim.lr": 1e-9}), check=False, forked=False)
    assert proc.returncode == 2
    assert "error: overfit one batch: the loss went from" in proc.stderr and "on one batch of 32" in proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr  # --debug: full tracebacks


def test_debug_turns_on_anomaly_detection(digits_root, tmp_path):
    proc = run_cli("train.py", debug_args(digits_root, tmp_path), check=False, env={"DIST_TRAIN_FAULT": "nan@step:2"},
                   forked=False)
    assert proc.returncode != 0
    assert "returned nan values in its 0th output" in proc.stderr  # torch.autograd.detect_anomaly names the op


def test_debug_refuses_a_launcher(digits_root, tmp_path):
    proc = run_cli("train.py", debug_args(digits_root, tmp_path), processes=2, check=False)
    assert "error: --debug runs one process: python train.py --config X --debug" in proc.stderr


def test_wandb_offline_logs_from_the_main_process_only(digits_root, tmp_path):
    if os.environ.get("CI") != "true":  # CI installs it (the dev extra): there a missing wandb must fail
        pytest.importorskip("wandb")
    run_cli("train.py", ["--config", config_path("digits.yaml"),
                         *tiny_overrides(digits_root, tmp_path, **{"tracking.wandb": "true", "train.epochs": 1})],
            processes=2, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # one run, written by rank 0
    history, config = [], []
    for record in wandb_records(next(runs[0].glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            config += [i.key for i in record.config.update]
    assert [h["_step"] for h in history] == list(range(1, 21))  # one row per optimizer step
    assert history[-1]["val/accuracy"] == read_jsonl(tmp_path / "metrics.jsonl")[0]["val_accuracy"]
    assert "optim.lr" in config and "tracking.wandb" in config


def wandb_records(path):
    """The records of a .wandb file: a LevelDB-style log (7-byte file header, 32 KiB blocks of chunks,
    each with a 7-byte header: crc, length, type) of wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


class Rank:
    def __init__(self, main: bool):
        self.is_main_process = main


def test_progress_bar_on_the_main_process_only_and_only_on_a_terminal(capsys, monkeypatch):
    for _ in progress(range(3), "epoch 1", Rank(main=True)):  # (pytest's capture is not a terminal)
        pass
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(report, "bars", lambda: True)
    for _ in progress(range(3), "epoch 1", Rank(main=False)):
        pass
    assert capsys.readouterr().err == ""
    bar = progress(range(3), "epoch 1", Rank(main=True))
    for _ in bar:
        pass
    bar.close()
    err = capsys.readouterr().err
    assert "epoch 1" in err and "/3" in err and "it/s" in err


def test_a_run_written_to_a_file_prints_step_lines_and_no_carriage_return(digits_root, tmp_path):
    proc = run_cli("train.py", ["--config", config_path("digits.yaml"),
                                *tiny_overrides(digits_root, tmp_path, **{"train.log_every_n_steps": 10, "train.epochs": 2})],
                   processes=2)
    assert "\r" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    # 1257 rows, 32 per process on 2: 20 steps an epoch; a line every 10 steps
    assert [line.split()[1] for line in lines] == ["10/40", "20/40", "30/40", "40/40"], proc.stdout
    assert re.fullmatch(r"step 20/40  epoch 1/2 100%  loss \d\.\d{4}  lr \S+  [\d,]+ samples/s  eta epoch 0:00:00, "
                        r"run \d:\d\d:\d\d", lines[1]), lines[1]
    assert lines[3].endswith("eta epoch 0:00:00, run 0:00:00")
    assert sum(line.startswith("epoch ") for line in proc.stdout.splitlines()) == 2  # the epochs' lines, as before
