"""The speed features keep their promises: no host sync per training step, the device decode path
(run here on the CPU) agrees with the workers' Pillow path, channels_last and torch.compile train."""
from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli, run_env, tiny_overrides
from PIL import Image
from torch.overrides import TorchFunctionMode

from dist_train.config import DEFAULT_PREPROCESSING, DataConfig
from dist_train.data.datasets import EncodedImageDataset, ImageDataset, ModelInput, build_transform
from dist_train.data.decode import BAD_TARGET, DeviceDecoder, collate_encoded, random_resized_crop_box
from dist_train.data.tables import Records
from dist_train.errors import SampleError

HOST_SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}

NORMALISE = {"mean": DEFAULT_PREPROCESSING["mean"], "std": DEFAULT_PREPROCESSING["std"]}  # what config.resolve fills in


class HostSyncs(TorchFunctionMode):
    """Records every tensor operation that makes the host wait for the device's result."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_SYNCS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def host_syncs_of_an_epoch(steps: int, log_every: int, fused: bool, cuda: bool = False) -> list[str]:
    """One epoch of Run.train_epoch on one process with the default guard (train.nonfinite=skip): the host syncs it
    made.

    Those of tensor methods (HostSyncs); with `cuda`, on the GPU, also every wait that torch's own detector
    (`torch.cuda.set_sync_debug_mode`) reports, as "cuda: <its message>"; it sees syncs inside kernels'
    launch code that no Python call shows.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from epoch_parts import tiny_model, tiny_run

    try:
        accelerator = Accelerator(cpu=not cuda)
        # pinned batches on the GPU: a copy from pageable memory would make the host wait (as the real loaders pin)
        run = tiny_run(accelerator, tiny_model(accelerator, fused), steps, max_grad_norm=1.0, log_every=log_every,
                       pin_memory=cuda)
        with warnings.catch_warnings(record=True) as caught, HostSyncs() as syncs:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                run.train_epoch(0)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        detected = [f"cuda: {w.message}" for w in caught if "synchroniz" in str(w.message)]
        return syncs.calls + detected
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_training_steps_make_no_host_sync():
    """With the fused optimizer, the host waits for the device only when it logs and at the epoch's end."""
    short, long = host_syncs_of_an_epoch(5, 1000, fused=True), host_syncs_of_an_epoch(40, 1000, fused=True)
    assert len(long) == len(short), (short, long)
    logged = host_syncs_of_an_epoch(40, 10, fused=True)
    assert 4 <= len(logged) - len(long) <= 4 * 3, logged  # a few per log line, 4 log lines
    # the detector sees per-step syncs where there are some: the guard reads its verdict each step without fused kernels
    assert len(host_syncs_of_an_epoch(40, 1000, fused=False)) >= len(long) + 40


def test_under_ddp_the_guard_adds_no_collective_and_a_nan_on_one_rank_is_skipped_by_both(tmp_path):
    """The verdict travels in DDP's gradient all-reduce: no collective of its own per step; the NaN loss
    (with a finite gradient) of rank 1 at step 3 is still skipped by both ranks, which end identical."""
    run_cli("tests/guard_script.py", [str(tmp_path)], processes=2, env={"DIST_TRAIN_FAULT": "nanloss@step:3#1"})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for seen in ranks:
        assert seen["via_gradients"] and seen["steps"] == 45 and seen["finite"]
        assert seen["collectives_40_steps"] == seen["collectives_5_steps"], seen  # none per step: the epoch's end only
        assert len(seen["collectives_40_steps"]) <= 2, seen
        assert seen["skipped"] == 1, seen
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]


# ----------------------------------------------------------------------------------------------
# decoding on the device (here: the CPU)


def photo(seed: int, width: int = 72, height: int = 56) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BICUBIC)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Records:
    root = tmp_path_factory.mktemp("jpegs")
    paths = []
    for i in range(6):
        paths.append(root / f"{i}.jpg")
        photo(i, 72 + 8 * i, 56 + 4 * i).save(paths[-1], quality=95)
    return Records(paths, [i % 3 for i in range(6)], [str(i) for i in range(6)])


def decoded_on_device(records: Records, cfg: DataConfig, crop: str, flip_p: float, bad_samples: str = "error"):
    dataset = EncodedImageDataset(records, cfg, crop, flip_p)
    batch, targets, _ = collate_encoded([dataset[i] for i in range(len(dataset))])
    decoder = DeviceDecoder(torch.device("cpu"), cfg.image_size, cfg.channels, cfg.mean, cfg.std, bad_samples)
    return decoder(batch, targets)


def test_device_decode_matches_the_workers_pillow_path(jpegs):
    cfg = DataConfig(image_size=32, **NORMALISE)
    images, targets = decoded_on_device(jpegs, cfg, "resize", 0.0)
    pillow = ImageDataset(jpegs, build_transform(cfg, train=False), 3)
    reference = torch.stack([pillow[i][0] for i in range(len(jpegs.paths))])
    assert images.shape == reference.shape == (6, 3, 32, 32) and targets.tolist() == jpegs.targets.tolist()
    # two resamplers (roi_align's averaged bilinear samples vs Pillow-style antialiasing) on smooth images
    assert (images - reference).abs().mean() < 0.05, (images - reference).abs().mean()
    flipped, _ = decoded_on_device(jpegs, cfg, "resize", 1.0)
    assert torch.allclose(flipped, images.flip(-1))


def test_device_crops_follow_the_sample_and_epoch(jpegs):
    cfg = DataConfig(image_size=16, **NORMALISE)
    dataset = EncodedImageDataset(jpegs, cfg, "random_resized_crop", 0.5, seed=3)
    first = [dataset[i][0]["box"] for i in range(6)]
    assert first == [dataset[i][0]["box"] for i in range(6)]  # a function of (seed, epoch, index): any worker, any rank
    dataset.set_epoch(1)
    assert first != [dataset[i][0]["box"] for i in range(6)]
    for seed in range(200):
        x0, y0, x1, y1 = random_resized_crop_box(500, 375, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(seed))
        assert 0 <= x0 < x1 <= 500 and 0 <= y0 < y1 <= 375
        area = (x1 - x0) * (y1 - y0) / (500 * 375)
        assert 0.07 <= area <= 1.0 and 0.7 <= (x1 - x0) / (y1 - y0) <= 1.4


def test_device_decode_names_a_corrupt_jpeg_or_skips_it(jpegs, tmp_path):
    broken = tmp_path / "broken.jpg"
    data = jpegs.paths[0].read_bytes()
    broken.write_bytes(data[:700] + bytes(len(data) - 700))  # the header reads, the entropy-coded data is zeros
    records = Records(jpegs.paths[:2] + [broken], [0, 1, 2], ["a", "b", "c"])
    with pytest.raises(SampleError, match="cannot decode image .*broken.jpg"):
        decoded_on_device(records, DataConfig(image_size=16, **NORMALISE), "resize", 0.0)
    images, targets = decoded_on_device(records, DataConfig(image_size=16, **NORMALISE), "resize", 0.0, bad_samples="skip")
    assert targets.tolist() == [0, 1, BAD_TARGET] and images.shape == (3, 3, 16, 16)


def test_model_input_lays_out_channels_last():
    images, _ = ModelInput(DataConfig(), torch.device("cpu"), False, torch.float32, True)(torch.randn(2, 3, 8, 8), torch.zeros(2))
    assert images.is_contiguous(memory_format=torch.channels_last)


def test_two_processes_train_and_predict_with_device_decoding(jpeg_digits, tmp_path):
    overrides = tiny_overrides(jpeg_digits, tmp_path, **{
        "data.source": "csv", "data.decode": "device", "data.image_size": 16, "data.num_workers": 1,
        "data.train_crop": "random_resized_crop", "data.crop_scale": "[0.5, 1.0]",
        "data.train_augment": "[{name: RandomHorizontalFlip}]", "train.channels_last": "true", "train.epochs": 3,
    })
    run_cli("train.py", overrides, processes=2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_accuracy"] > 0.5, records[-1]  # it learns from device-decoded crops
    assert all(0 <= r["data_wait_fraction"] <= 1 for r in records)
    run_cli("predict.py", overrides + [f"--checkpoint={tmp_path / 'checkpoints' / 'best'}"], processes=2)
    rows = list(csv.DictReader(open(tmp_path / "submission.csv", newline="")))
    expected = [row["id"] for row in csv.DictReader(open(jpeg_digits / "info.csv", newline=""))]
    assert [row["id"] for row in rows] == expected


def test_device_decoding_refuses_what_it_cannot_do(digits_root, tmp_path):
    proc = run_cli("train.py", tiny_overrides(digits_root, tmp_path, **{"data.decode": "device"}), check=False)
    assert proc.returncode == 2 and "data.decode=device decodes JPEG files only" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_torch_compile_trains(digits_root, tmp_path):
    run_cli("train.py", tiny_overrides(digits_root, tmp_path, **{"train.compile": "true", "train.max_steps": 3,
                                                                  "train.epochs": 1}), timeout=600)
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["global_step"] == 3 and (tmp_path / "checkpoints" / "best" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------
# the benchmark itself runs (its figures live in BENCHMARKS.md, not here)


def test_throughput_benchmark_runs_every_runner_and_ends_with_the_ratio(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--device", "cpu", "--data", str(tmp_path / "jpegs"),
                           "--count", "96", "--size", "48x40", "--classes", "3", "--image-size", "16", "--batch-size", "8",
                           "--steps", "3", "--processes", "2", "--repeats", "2", "--workers", "0",
                           "--runners", "synthetic,plain,dist_train,dist_train+train.nonfinite=ignore"],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in (
        "synthetic", "plain", "dist_train", "dist_train+train.nonfinite=ignore")}
    assert set(rows) == {"synthetic", "plain", "dist_train", "dist_train+train.nonfinite=ignore"}, proc.stdout + proc.stderr
    assert all(row[1] == "2" and float(row[2]) > 0 for row in rows.values()), rows
    assert len(rows["plain"][rows["plain"].index("run:") + 1:]) == 2  # two repeats of plain and dist_train
    assert "dist_train / plain loop step time =" in proc.stdout and "(per repeat: median" in proc.stdout
    assert lines[-1].startswith("ratio_vs_plain=") and float(lines[-1].split("=")[1]) > 0


def test_compare_trees_says_equal_for_one_tree_and_names_what_a_change_moved(tmp_path):
    """bench/compare_trees.py, the check that a refactoring keeps training bit for bit: a tree against itself is
    equal in everything (exit 0); against a copy whose digits config has another weight decay, it says DIFF."""
    import shutil
    import subprocess
    import sys

    copy = tmp_path / "changed"
    copy.mkdir()
    for name in ("train.py", "accelerate_config.yaml", "dist_train", "configs"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, copy / name)
    config = copy / "configs" / "digits.yaml"
    text = config.read_text()
    assert "  weight_decay: 1.0e-4\n" in text
    config.write_text(text.replace("  weight_decay: 1.0e-4\n", "  weight_decay: 0.3\n"))  # the change under test
    command = [sys.executable, str(ROOT / "bench" / "compare_trees.py")]
    # the two comparisons at once: each trains one process at a time, and the machine has two cores
    procs = [subprocess.Popen([*command, str(tree), str(ROOT), "plateau_es"], cwd=ROOT, env=run_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for tree in (ROOT, copy)]
    (same_out, same_err), (moved_out, moved_err) = (p.communicate(timeout=600) for p in procs)
    assert procs[0].returncode == 0, same_out + same_err[-3000:]
    assert same_out.splitlines()[0] == "plateau_es: weights = optimizer = metrics = trainer_state ="
    assert procs[1].returncode == 1 and moved_out.startswith("plateau_es: weights DIFF"), moved_out + moved_err[-3000:]
    assert "    weights: [" in moved_out
