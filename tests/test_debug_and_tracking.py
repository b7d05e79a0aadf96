"""`python train.py --debug`, W&B in offline mode, progress bars on the main process only."""
from __future__ import annotations

import csv
import json
import os
import re
import time

import pytest
from conftest import config_path, read_jsonl, run_cli, tiny_overrides

from dist_train.rundir import report
from dist_train.rundir.logged import wandb_history, wandb_records
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
    history = list(wandb_history(next(runs[0].glob("run-*.wandb"))))
    config = [i.key for r in wandb_records(next(runs[0].glob("run-*.wandb"))) if r.WhichOneof("record_type") == "config"
              for i in r.config.update]
    # a row per optimizer step and one for the evaluation, each at its step (the x-axis W&B's charts use)
    assert [h["global_step"] for h in history] == [*range(1, 21), 20]
    assert history[-1]["val/accuracy"] == read_jsonl(tmp_path / "metrics.jsonl")[0]["val_accuracy"]
    assert "optim.lr" in config and "tracking.wandb" in config


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


def test_tensorboard_resumed_at_an_evaluations_step_shows_it_once(tmp_path):
    """A checkpoint taken before its step's evaluation (a preemption at an epoch's last step), whose run went on to log
    that evaluation and one more step before it was killed: the resume evaluates at that step again. TensorBoard shows
    the evaluation once and the step's own training values kept; what came after the checkpoint is purged and logged
    again."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from dist_train.rundir.tracking import ResumableTensorBoard

    killed = SummaryWriter(str(tmp_path / "tensorboard"))
    for step in range(1, 22):
        killed.add_scalar("train/loss", 1 / step, step)
    killed.add_scalar("epoch", 1, 20)
    killed.add_scalar("val/accuracy", 0.5, 20)
    killed.close()
    # another second: TensorBoard reads a directory's event files in the order of their names, whose first field is the
    # second they were opened in (two writers of one process within a second are ordered by a counter, as text)
    time.sleep(1.05)
    resumed = ResumableTensorBoard(tmp_path, resumed_at=20)
    resumed.start()
    resumed.log({"epoch": 1, "val/accuracy": 0.5, "train/epoch_loss": 0.3}, step=20)
    resumed.log({"train/loss": 0.04}, step=21)
    assert resumed.held.line() == "tensorboard: 2 values the killed run logged for step 20 are kept, not logged again"
    resumed.writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0}, purge_orphaned_data=True)
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("epoch")] == [(20, 1.0)]
    assert [e.step for e in events.Scalars("val/accuracy")] == [20] and [e.step for e in events.Scalars("train/epoch_loss")] == [20]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/loss")][-2:] == [(20, 0.05), (21, 0.04)]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 22))
