"""Real multi-process runs (gloo on CPU): sharding, gathering, identical weights, one submission, LR parity."""
from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import re
import subprocess
import sys

import pytest
import torch
from conftest import BIN, ROOT, config_path, read_jsonl, run_cli, tiny_overrides
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dist_train
from dist_train.config import ModelConfig
from dist_train.job.distributed import BACKEND_ENV
from dist_train.models.networks import build_model, read_weights
from dist_train.rundir.weights import state_digest

TRAIN = 1257  # digits training split
VAL = 270
TEST = 270


def train_run(digits_root, out, processes, **overrides):
    proc = run_cli("train.py", ["--config", config_path("digits.yaml"), *tiny_overrides(digits_root, out, **overrides)], processes)
    (out / "output.txt").write_text(proc.stdout + proc.stderr)
    return json.loads((out / "run_info.json").read_text()), read_jsonl(out / "metrics.jsonl")


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def two_process_run(digits_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    info, metrics = train_run(digits_root, out, 2)
    return out, info, metrics


def test_two_processes_each_train_on_half_and_end_with_identical_weights(two_process_run):
    out, info, metrics = two_process_run
    assert info["num_processes"] == 2 and info["distributed_type"] == "DistributedType.MULTI_CPU"
    batches = math.ceil(math.ceil(TRAIN / 32) / 2)  # 40 batches of 32 dealt out to 2 ranks
    assert info["batches_per_epoch_per_process"] == batches == 20
    assert info["global_batch"] == 64
    for record in metrics:
        assert record["rank_batches"] == [batches, batches]
        # each rank sees half; the last batch is completed with repeats from the epoch's start
        assert record["rank_samples"] == [batches * 32, batches * 32]
        assert sum(record["rank_samples"]) - TRAIN < 64
        assert record["val_samples"] == VAL  # gathered, padding dropped: each sample once
    digests = info["final_weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    model = build_model(ModelConfig(), 10, 1)
    model.load_state_dict(read_weights(out / "checkpoints" / "last" / "model.safetensors"))
    assert state_digest(model.state_dict()) == digests[0]  # the checkpoint holds exactly the trained weights
    assert (out / "checkpoints" / "best" / "model.safetensors").is_file()
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1  # one writer: the main process


def test_a_ddp_run_says_nothing_of_deepspeed(two_process_run):
    """DeepSpeed is installed (the deepspeed extra) but a DDP run never imports it: its import prints a warning on
    CPU machines and costs start-up time."""
    output = (two_process_run[0] / "output.txt").read_text()
    assert "dist_train: 2 process(es)" in output
    assert "deepspeed" not in output.lower() and "Setting accelerator" not in output


def test_run_directory_contents(two_process_run):
    out, info, metrics = two_process_run
    assert (out / "config.yaml").is_file()
    assert [m["epoch"] for m in metrics] == [1, 2] and [m["step"] for m in metrics] == [20, 40]
    for key in ("val_loss", "val_accuracy", "val_f1_macro", "lr", "samples_per_sec"):
        assert all(isinstance(m[key], float) for m in metrics), key
    assert info["versions"]["torch"] == torch.__version__
    # one version: the package's, its installed metadata's (setup.py reads it), the run's record
    assert info["versions"]["dist_train"] == dist_train.__version__ == importlib.metadata.version("dist_train")
    state = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and state["global_step"] == 40
    assert [s[1] for s in scalars(out, "val/accuracy")] == pytest.approx([m["val_accuracy"] for m in metrics])
    assert len(scalars(out, "train/loss")) == 40  # log_every_n_steps=1: one point per optimizer step


def test_tensorboard_tells_the_story_from_one_writer(two_process_run):
    out, info, metrics = two_process_run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    steps = list(range(1, 41))  # log_every_n_steps=1, 2 epochs of 20 optimizer steps
    for tag in ("train/loss", "train/lr", "train/samples_per_sec", "train/grad_norm"):
        assert [e.step for e in events.Scalars(tag)] == steps, tag
    for tag in ("val/loss", "val/accuracy", "val/f1_macro", "val/precision_macro", "val/recall_macro", "train/epoch_loss"):
        assert [e.step for e in events.Scalars(tag)] == [20, 40], tag
    per_class = [t for t in events.Tags()["scalars"] if t.startswith("val_f1_per_class/")]
    assert sorted(per_class) == [f"val_f1_per_class/{d}" for d in range(10)]
    for epoch, record in enumerate(metrics):  # macro-F1 is the mean of the per-class F1s logged
        mean = sum(events.Scalars(tag)[epoch].value for tag in per_class) / 10
        assert mean == pytest.approx(record["val_f1_macro"], abs=1e-6)
    figure = events.Images("val/confusion_matrix")
    assert [e.step for e in figure] == [20, 40] and figure[0].width >= 300
    mistakes = events.Images("val/worst_mistakes")
    assert 1 <= len(mistakes) <= 2 and mistakes[0].width % 96 == 0  # epochs with mistakes, 96 px per tile
    assert "_hparams_/experiment" in events.summary_metadata
    best = events.Scalars("hparam/best_val_accuracy")
    assert len(best) == 1 and best[0].value == pytest.approx(info["best"]["value"])
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("processes", [2, 3])
def test_submission_is_identical_whatever_the_number_of_processes(two_process_run, tmp_path, digits_root, processes):
    out, _, _ = two_process_run
    files = {}
    for n in (1, processes):
        files[n] = tmp_path / f"submission_{n}.csv"
        args = ["--config", config_path("digits.yaml"), "--checkpoint", str(out / "checkpoints" / "best"),
                "--output", str(files[n]), *tiny_overrides(digits_root, out)]
        run_cli("predict.py", args, processes=n)
    assert files[1].read_bytes() == files[processes].read_bytes()
    with open(files[1]) as f:
        rows = list(csv.DictReader(f))
    with open(digits_root / "info.csv") as f:
        expected_ids = [r["id"] for r in csv.DictReader(f)]
    assert [r["id"] for r in rows] == expected_ids  # every id once, in the input's order
    assert len(rows) == TEST and {r["label"] for r in rows} <= {str(d) for d in range(10)}


@pytest.fixture(scope="module")
def reference_run(digits_root, tmp_path_factory):
    """One process with the global batch (64): the run the others must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    train_run(digits_root, out, 1, **{"data.batch_size": 64, "train.epochs": 4, "scheduler.warmup_epochs": 1})
    return out


def test_lr_schedule_is_the_same_with_two_processes_and_accumulation(reference_run, digits_root, tmp_path):
    info, _ = train_run(digits_root, tmp_path, 2, **{"data.batch_size": 16, "train.grad_accum_steps": 2,
                                                     "train.epochs": 4, "scheduler.warmup_epochs": 1})
    assert info["global_batch"] == 64 and info["optimizer_steps_per_epoch"] == 20
    reference = scalars(reference_run, "train/lr")
    assert [s for s, _ in reference] == list(range(1, 81))
    assert scalars(tmp_path, "train/lr") == reference
    # and it is the closed form: linear warm-up over one epoch, then cosine to 0 over the rest
    lr = 3e-3
    expected = [lr * (0.01 + 0.99 * s / 20) if s < 20 else lr * 0.5 * (1 + math.cos(math.pi * (s - 20) / 60)) for s in range(1, 81)]
    assert [v for _, v in reference] == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_plain_num_processes_on_cpu_is_refused_not_run_unsharded(digits_root, tmp_path):
    cmd = [str(BIN / "accelerate"), "launch", "--num_processes", "2", str(ROOT / "train.py"),
           "--config", config_path("digits.yaml"), *tiny_overrides(digits_root, tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "error: `accelerate launch --num_processes 2` started 1 process" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_plain_num_processes_through_the_launch_module_is_refused_too(digits_root, tmp_path):
    """`python -m accelerate.commands.launch` is how a Python without the `accelerate` script launches."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", str(ROOT / "train.py"),
           "--config", config_path("digits.yaml"), *tiny_overrides(digits_root, tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "error: `accelerate launch --num_processes 2` started 1 process" in proc.stderr, proc.stderr[-2000:]


def test_a_backend_switch_that_cannot_work_is_one_line(digits_root, tmp_path):
    proc = run_cli("train.py", tiny_overrides(digits_root, tmp_path), env={BACKEND_ENV: "mpi"}, check=False)
    assert proc.returncode == 2 and f"error: {BACKEND_ENV}='mpi': choose nccl or gloo" in proc.stderr, proc.stderr[-2000:]
    if not torch.cuda.is_available():
        proc = run_cli("train.py", tiny_overrides(digits_root, tmp_path), env={BACKEND_ENV: "nccl"}, check=False)
        assert proc.returncode == 2 and f"error: {BACKEND_ENV}=nccl needs a GPU" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_default_digits_config_reaches_097_and_a_good_submission(digits_root, tmp_path):
    """The shipped default, as `make demo` runs it, on 2 processes (its loader workers from the fork server); what
    the two commands print is the project's own lines: no warning of a library's (the resource tracker's "leaked
    semaphore objects" after predict was one)."""
    overrides = [f"data.root={digits_root}", f"output_dir={tmp_path}"]
    trained = run_cli("train.py", ["--config", config_path("digits.yaml"), *overrides], processes=2, timeout=600)
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["best"]["metric"] == "val_accuracy" and info["best"]["value"] >= 0.97
    predicted = run_cli("predict.py", ["--config", config_path("digits.yaml"), "--checkpoint",
                                       str(tmp_path / "checkpoints" / "best"), *overrides], processes=2)
    assert not foreign_warnings(trained.stdout + trained.stderr + predicted.stdout + predicted.stderr)
    with open(tmp_path / "submission.csv") as f:
        predicted = {r["id"]: r["label"] for r in csv.DictReader(f)}
    with open(digits_root / "test_labels.csv") as f:
        truth = {r["id"]: r["label"] for r in csv.DictReader(f)}
    assert predicted.keys() == truth.keys()
    assert sum(predicted[k] == truth[k] for k in truth) / len(truth) >= 0.95


def foreign_warnings(output: str) -> list[str]:
    """Lines of Python warnings (`file.py:12: UserWarning: ...`, `warnings.warn(...)`): ours print `warning: ...`.
    Accelerate's note that the default port is taken (another job on the machine) says something true: let through."""
    return [line for line in output.splitlines() if re.search(r"\w+Warning\b|warnings\.warn\(", line)
            and "is already in use. Accelerate will attempt to launch" not in line]


def test_foreign_warnings_are_found_and_ours_are_not():
    said = ("warning: checkpoint x is corrupt\n/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: "
            "resource_tracker: There appear to be 2 leaked semaphore objects to clean up at shutdown\n  warnings.warn('...")
    assert [line[:30] for line in foreign_warnings(said)] == ["/usr/lib/python3.11/multiproce", "  warnings.warn('..."]


def test_decisions_are_identical_on_every_rank(digits_root, tmp_path):
    """Early stopping, ReduceLROnPlateau and the best checkpoint, driven by the gathered metric.

    Monitoring val_accuracy in `min` mode makes every epoch after the first a non-improvement, so the
    decisions are known in advance: plateau cuts the LR after epoch 2, the run stops after epoch 3 on
    both ranks (a rank that went on alone would hang the job), and `best` stays at epoch 1.
    Also runs the class-balanced sampler across 2 processes.
    """
    info, metrics = train_run(digits_root, tmp_path, 2, **{
        "train.epochs": 6, "train.early_stopping_patience": 2, "checkpoint.mode": "min",
        "scheduler.name": "plateau", "scheduler.plateau_patience": 0, "data.balanced_sampler": "true"})
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["val_accuracy"] < metrics[1]["val_accuracy"] and metrics[0]["val_accuracy"] < metrics[2]["val_accuracy"]
    assert metrics[0]["lr"] == metrics[1]["lr"] == pytest.approx(3e-3)
    assert metrics[2]["lr"] == pytest.approx(3e-4)
    assert info["stopped_early"] and info["epochs_completed"] == 3
    assert info["best"]["epoch"] == 1 and info["best"]["value"] == metrics[0]["val_accuracy"]
    assert len(set(info["final_weights_sha256_per_rank"])) == 1
    assert all(m["rank_batches"] == [20, 20] for m in metrics)
    best = json.loads((tmp_path / "checkpoints" / "best" / "trainer_state.json").read_text())
    assert best["epoch"] == 1


def test_bf16_mixed_precision_on_cpu(digits_root, tmp_path):
    info, metrics = train_run(digits_root, tmp_path, 1, **{"train.mixed_precision": "bf16", "train.epochs": 1})
    assert info["mixed_precision"] == "bf16" and metrics[0]["val_samples"] == VAL
    assert math.isfinite(metrics[0]["val_loss"])
