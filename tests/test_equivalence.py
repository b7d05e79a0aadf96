"""Same answer at every scale: N processes x batch b x accumulation A == 1 process x batch N*b*A.

Real gloo processes, float32, no augmentation, an MLP without normalisation (or SyncBatchNorm), SGD
with momentum, clipping, label smoothing and a warm-up + cosine schedule. The data set sizes do not
divide evenly (1257 training digits: the last global batch is short, padded by repeats on 2 ranks).
Tolerances: weights within 2e-6 (absolute; float32 sums reduced in another order), per-step losses
within 1e-5 relative, LRs exactly equal.
"""
from __future__ import annotations

import csv
import json

import pytest
from conftest import config_path, read_jsonl, run_cli, tiny_overrides
from test_distributed import scalars

from dist_train.models.networks import read_weights

WEIGHT_TOL = 2e-6
EXACT = {"model.name": "mlp", "model.width": 24, "optim.name": "sgd", "optim.lr": 0.05, "optim.momentum": 0.9,
         "scheduler.warmup_epochs": 0.5, "train.max_grad_norm": 1.0, "loss.label_smoothing": 0.1, "train.epochs": 2}


def train(digits_root, out, processes, **overrides):
    args = ["--config", config_path("digits.yaml"), *tiny_overrides(digits_root, out, **{**EXACT, **overrides})]
    run_cli("train.py", args, processes)
    return read_jsonl(out / "metrics.jsonl")


def max_weight_diff(a, b) -> float:
    wa = read_weights(a / "checkpoints" / "last" / "model.safetensors")
    wb = read_weights(b / "checkpoints" / "last" / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def assert_same_steps(a, b):
    la, lb = scalars(a, "train/loss"), scalars(b, "train/loss")
    assert [s for s, _ in la] == [s for s, _ in lb] == list(range(1, 41))
    assert [v for _, v in la] == pytest.approx([v for _, v in lb], rel=1e-5)
    assert scalars(a, "train/lr") == scalars(b, "train/lr")


@pytest.fixture(scope="module")
def big_batch(digits_root, tmp_path_factory):
    """1 process, batch 64: the reference."""
    out = tmp_path_factory.mktemp("big")
    return out, train(digits_root, out, 1, **{"data.batch_size": 64})


@pytest.mark.parametrize("processes,batch,accum", [(2, 32, 1), (1, 16, 4), (2, 16, 2)],
                         ids=["2procs_x32", "1proc_x16_accum4", "2procs_x16_accum2"])
def test_same_weights_losses_and_lrs_as_one_big_batch(big_batch, digits_root, tmp_path, processes, batch, accum):
    ref_dir, ref_metrics = big_batch
    metrics = train(digits_root, tmp_path, processes, **{"data.batch_size": batch, "train.grad_accum_steps": accum})
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["global_batch"] == 64 and info["optimizer_steps_per_epoch"] == 20
    if accum == 4:  # 79 micro-batches: the last window holds 3 of them, the last of 9 samples
        assert info["batches_per_epoch_per_process"] == 79
    diff = max_weight_diff(ref_dir, tmp_path)
    print(f"max weight diff {processes} procs x {batch} x accum {accum} vs 1 x 64: {diff:.3g}")
    assert diff <= WEIGHT_TOL
    assert_same_steps(ref_dir, tmp_path)
    for ours, ref in zip(metrics, ref_metrics, strict=True):
        assert ours["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
        assert ours["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)
        assert ours["val_accuracy"] == ref["val_accuracy"] and ours["lr"] == ref["lr"]
    assert len(set(info["final_weights_sha256_per_rank"])) == 1


def write_split(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "label"])
        writer.writerows(rows)


@pytest.fixture(scope="module")
def eval_sets(digits_root, tmp_path_factory):
    """The 5-sample validation set, and all 1,797 digits as one validation set."""
    root = tmp_path_factory.mktemp("evalsets")
    rows = []
    for name in ("train.csv", "val.csv"):
        with open(digits_root / name) as f:
            rows += [[r["id"], r["image"], r["label"]] for r in csv.DictReader(f)]
    with open(digits_root / "info.csv") as f, open(digits_root / "test_labels.csv") as g:
        rows += [[r["id"], r["image"], t["label"]] for r, t in zip(csv.DictReader(f), csv.DictReader(g))]
    write_split(root / "five.csv", rows[:5])
    write_split(root / "all.csv", rows)
    return root


@pytest.mark.parametrize("val_set,processes", [("five.csv", 2), ("five.csv", 3), ("all.csv", 2)])
def test_metrics_count_every_sample_once_whatever_the_processes(big_batch, digits_root, eval_sets, tmp_path, val_set, processes):
    ref_dir, _ = big_batch
    results = {}
    for n in (1, processes):
        output = tmp_path / f"pred_{n}.csv"
        args = ["--config", config_path("digits.yaml"), "--checkpoint", str(ref_dir / "checkpoints" / "last"),
                "--split", "val", "--output", str(output),
                *tiny_overrides(digits_root, ref_dir, **{**EXACT, "data.val": str(eval_sets / val_set),
                                                         "data.image_root": str(digits_root), "data.eval_batch_size": 4})]
        run_cli("predict.py", args, processes=n)
        results[n] = json.loads(output.with_suffix(".metrics.json").read_text())
        assert output.read_text().count("\n") == results[n]["val_samples"] + 1
    expected = 5 if val_set == "five.csv" else 1797
    single, multi = results[1], results[processes]
    assert single["val_samples"] == multi["val_samples"] == expected  # 5 < 3 processes x batch 4: padded, then dropped
    assert multi["confusion_matrix"] == single["confusion_matrix"]
    for key in ("val_accuracy", "val_f1_macro", "val_precision_macro", "val_recall_macro"):
        assert multi[key] == single[key], key
    assert multi["val_loss"] == pytest.approx(single["val_loss"], rel=1e-6)


def test_decisions_equal_the_single_process_decisions(digits_root, tmp_path):
    """Plateau LR cuts, early stopping and the best epoch: 2 processes decide as 1 process does."""
    decisions = {"train.epochs": 6, "train.early_stopping_patience": 2, "checkpoint.monitor": "val_loss",
                 "checkpoint.mode": "max", "scheduler.name": "plateau", "scheduler.plateau_patience": 0,
                 "scheduler.warmup_epochs": 0}
    runs = {}
    for processes, batch in ((1, 64), (2, 32)):
        out = tmp_path / f"p{processes}"
        metrics = train(digits_root, out, processes, **{"data.batch_size": batch, **decisions})
        runs[processes] = (metrics, json.loads((out / "run_info.json").read_text()))
    (m1, i1), (m2, i2) = runs[1], runs[2]
    assert [m["epoch"] for m in m1] == [m["epoch"] for m in m2]
    assert [m["lr"] for m in m1] == [m["lr"] for m in m2]
    assert [m["val_loss"] for m in m1] == pytest.approx([m["val_loss"] for m in m2], rel=1e-5)
    assert i1["stopped_early"] == i2["stopped_early"] and i1["epochs_completed"] == i2["epochs_completed"]
    assert i1["best"]["epoch"] == i2["best"]["epoch"]
    assert len({m["lr"] for m in m1}) > 1  # the plateau did cut the LR


@pytest.fixture(scope="module")
def subset_256(digits_root, tmp_path_factory):
    """256 training digits: every global batch of 64 is full, so BN sees no padding repeats."""
    root = tmp_path_factory.mktemp("sub")
    with open(digits_root / "train.csv") as f:
        rows = [[r["id"], r["image"], r["label"]] for r in csv.DictReader(f)][:256]
    write_split(root / "train.csv", rows)
    return {"data.train": str(root / "train.csv"), "data.image_root": str(digits_root),
            "data.val": str(digits_root / "val.csv")}


def test_sync_batchnorm_matches_the_big_batch_statistics(digits_root, subset_256, tmp_path):
    bn = {**subset_256, "model.name": "small_cnn", "model.width": 8, "train.epochs": 1}
    train(digits_root, tmp_path / "one", 1, **{**bn, "data.batch_size": 64})
    train(digits_root, tmp_path / "sync", 2, **{**bn, "data.batch_size": 32, "model.sync_batchnorm": "true"})
    train(digits_root, tmp_path / "local", 2, **{**bn, "data.batch_size": 32})
    ref = read_weights(tmp_path / "one" / "checkpoints" / "last" / "model.safetensors")
    sync = read_weights(tmp_path / "sync" / "checkpoints" / "last" / "model.safetensors")
    local = read_weights(tmp_path / "local" / "checkpoints" / "last" / "model.safetensors")
    stats = [k for k in ref if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 6
    sync_diff = max((ref[k] - sync[k]).abs().max().item() for k in ref if k.endswith(("running_mean", "running_var", "weight", "bias")))
    local_diff = max((ref[k] - local[k]).abs().max().item() for k in stats)
    print(f"BN running stats / weights vs big batch: sync {sync_diff:.3g}, per-process BN {local_diff:.3g}")
    assert sync_diff <= 1e-5
    assert local_diff > 100 * max(sync_diff, 1e-7)  # without sync, statistics are per-process and differ


def test_parity_tool_reports_layouts_lrs_and_weight_difference(digits_root):
    overrides = [o for o in tiny_overrides(digits_root, "/unused", **{**EXACT, "data.batch_size": 16})
                 if not o.startswith("output_dir=")]  # parity chooses its own run directories
    proc = run_cli_module("dist_train.commands.parity", ["--config", config_path("digits.yaml"), *overrides, "--steps", "3"])
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("max_weight_diff=")
    assert float(lines[-1].split("=")[1]) <= WEIGHT_TOL
    table = "\n".join(lines)
    for layout in ("1 proc x 32 x accum 1", "2 proc x 16 x accum 1", "2 proc x 8 x accum 2"):
        assert layout in table
    steps = [line for line in lines if line.strip().startswith("step ")]
    assert len(steps) == 3 and not any("differs" in line for line in steps)


def run_cli_module(module, args):
    import os
    import subprocess
    import sys

    from conftest import ROOT
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
