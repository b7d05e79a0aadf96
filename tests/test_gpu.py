"""The CUDA paths: one GPU with bf16 and fp16, nvJPEG decoding, no host sync per step, DDP over NCCL on 2+
GPUs, DeepSpeed ZeRO-3 on a GPU.

Skipped on machines without CUDA (like the CI machine). On a GPU machine `make gpu-check` runs them with
the rest of the GPU check (bench/gpu_check.py); `python -m pytest tests/test_gpu.py` runs them alone.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT, config_path, read_jsonl, run_cli, run_env, tiny_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEEPSPEED_HINT = (
    "not installed (the GPU machines have no deepspeed and no network): `bash bench/gpu_wheels.sh` on a machine with "
    "network writes the wheels to wheels/; carry that directory along and `make gpu-check` unpacks them (README, GPU check)"
)


def train(digits_root, out, processes, launch=False, **overrides):
    run_cli("train.py", ["--config", config_path("digits.yaml"), *tiny_overrides(digits_root, out, **overrides)], processes,
            launch=launch)
    return json.loads((out / "run_info.json").read_text()), read_jsonl(out / "metrics.jsonl")


def submission_ids(path) -> list[str]:
    return [row["id"] for row in csv.DictReader(open(path, newline=""))]


def test_one_gpu_bf16_trains_and_predicts(digits_root, tmp_path):
    info, metrics = train(digits_root, tmp_path, 1, **{"train.mixed_precision": "bf16", "train.epochs": 2,
                                                       "data.num_workers": 2})
    assert info["devices"][0].split(":")[1] == "cuda", info["devices"]  # host:cuda (Accelerate's default device)
    assert info["distributed_type"] == "DistributedType.NO" and info["mixed_precision"] == "bf16"
    assert metrics[-1]["val_samples"] == 270 and metrics[-1]["val_accuracy"] > 0.5
    run_cli("predict.py", ["--config", config_path("digits.yaml"), "--checkpoint", str(tmp_path / "checkpoints" / "best"),
                           *tiny_overrides(digits_root, tmp_path, **{"data.num_workers": 2})])
    expected = submission_ids(digits_root / "info.csv")
    assert submission_ids(tmp_path / "submission.csv") == expected


def test_one_gpu_fp16_with_the_grad_scaler(digits_root, tmp_path):
    """fp16 exists on GPUs only: Accelerate's GradScaler, and the non-finite guard's per-step path beside it."""
    info, metrics = train(digits_root, tmp_path, 1, **{"train.mixed_precision": "fp16", "train.epochs": 2})
    assert info["mixed_precision"] == "fp16" and info["global_step"] == 2 * info["optimizer_steps_per_epoch"]
    assert metrics[-1]["val_accuracy"] > 0.5 and all(m["train_loss"] == m["train_loss"] for m in metrics)  # finite


def test_deterministic_runs_are_bitwise_equal_on_a_gpu(digits_root, tmp_path):
    """train.deterministic promises bit-for-bit reruns on one machine; on CUDA that needs cuBLAS's workspace
    setting and kernels that have a deterministic variant (BatchNorm, pooling backward)."""
    runs = [train(digits_root, tmp_path / name, 1, **{"train.deterministic": "true", "train.epochs": 1})[0] for name in "ab"]
    assert runs[0]["final_weights_sha256_per_rank"] == runs[1]["final_weights_sha256_per_rank"]


def test_decode_auto_picks_nvjpeg_on_a_gpu_and_trains_and_predicts(jpeg_digits, tmp_path):
    """The default data.decode=auto on a GPU with JPEG files: nvJPEG + roi_align in training and prediction."""
    from dist_train.config import DataConfig
    from dist_train.data.datasets import decodes_on_device
    from dist_train.data.splits import load_test_records

    overrides = tiny_overrides(jpeg_digits, tmp_path, **{
        "data.source": "csv", "data.image_size": 16, "data.num_workers": 2, "data.train_crop": "random_resized_crop",
        "data.crop_scale": "[0.5, 1.0]", "data.train_augment": "[{name: RandomHorizontalFlip}]",
        "train.mixed_precision": "bf16", "train.epochs": 3,
    })
    cfg = DataConfig(source="csv", root=str(jpeg_digits), train_augment=[{"name": "RandomHorizontalFlip"}])
    assert decodes_on_device(cfg, torch.device("cuda"), [load_test_records(cfg)])  # what auto resolves to here
    run_cli("train.py", ["--config", config_path("digits.yaml"), *overrides])
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert metrics[-1]["val_accuracy"] > 0.5, metrics[-1]  # it learns from nvJPEG-decoded crops
    run_cli("predict.py", ["--config", config_path("digits.yaml"), *overrides,
                           f"--checkpoint={tmp_path / 'checkpoints' / 'best'}"])
    assert submission_ids(tmp_path / "submission.csv") == submission_ids(jpeg_digits / "info.csv")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (make gpu-check tries 2 processes on one)")
def test_ddp_over_nccl_on_two_gpus(digits_root, tmp_path):
    info, metrics = train(digits_root, tmp_path, 2, **{"train.mixed_precision": "bf16"})
    assert info["distributed_type"] == "DistributedType.MULTI_GPU" and info["num_processes"] == 2
    assert all(m["rank_batches"] == [20, 20] for m in metrics)
    assert len(set(info["final_weights_sha256_per_rank"])) == 1


def test_deepspeed_zero3_on_a_gpu_and_predict_from_its_weights(digits_root, tmp_path):
    for package in ("deepspeed", "transformers"):  # Accelerate's DeepSpeed path imports transformers too
        pytest.importorskip(package, reason=DEEPSPEED_HINT)
    info, metrics = train(digits_root, tmp_path, 1, launch=True,  # DeepSpeed needs the launcher, even for 1 process
                          **{"deepspeed.enabled": "true", "deepspeed.zero_stage": 3, "train.mixed_precision": "bf16",
                             "model.name": "mlp"})
    assert info["distributed_type"] == "DistributedType.DEEPSPEED" and info["zero_stage"] == 3
    assert metrics[-1]["val_accuracy"] > 0.5
    run_cli("predict.py", ["--config", config_path("digits.yaml"), "--checkpoint", str(tmp_path / "checkpoints" / "last"),
                           *tiny_overrides(digits_root, tmp_path, **{"model.name": "mlp"})])
    assert (tmp_path / "submission.csv").read_text().count("\n") == 271


def test_training_steps_make_no_host_sync_on_a_gpu():
    """On the GPU, with torch's sync detector on: an epoch of fused-AdamW steps (logging off) waits for the
    device no more often in 40 steps than in 5 (at the epoch's end only)."""
    from test_speed import host_syncs_of_an_epoch

    short = host_syncs_of_an_epoch(5, 1000, fused=True, cuda=True)
    long = host_syncs_of_an_epoch(40, 1000, fused=True, cuda=True)
    assert len(long) == len(short), (short, long)
    # the detector sees a per-step sync where there is one: the guard reads its verdict each step without fused kernels
    unfused = host_syncs_of_an_epoch(40, 1000, fused=False, cuda=True)
    assert sum(s.startswith("cuda:") for s in unfused) >= sum(s.startswith("cuda:") for s in long) + 40, unfused


def test_nvjpeg_decode_matches_the_cpu_decode(tmp_path):
    from test_speed import photo

    from dist_train.config import DataConfig
    from dist_train.data.datasets import EncodedImageDataset
    from dist_train.data.decode import DeviceDecoder, collate_encoded
    from dist_train.data.tables import Records

    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.jpg")
        photo(i, 300 + 10 * i, 200 + 5 * i).save(paths[-1], quality=90)
    cfg = DataConfig(image_size=64, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    dataset = EncodedImageDataset(Records(paths, [0] * 8, [str(i) for i in range(8)]), cfg, "random_resized_crop", 0.5)
    batch, targets, _ = collate_encoded([dataset[i] for i in range(8)])
    pinned = batch.pin_memory()  # as the loader's pin-memory thread hands it over: all of it, for async copies
    assert all(d.is_pinned() for d in pinned.data) and pinned.boxes.is_pinned() and pinned.flips.is_pinned()
    outputs = {}
    for device in ("cpu", "cuda"):
        decoder = DeviceDecoder(torch.device(device), cfg.image_size, 3, cfg.mean, cfg.std)
        images, _ = decoder(pinned if device == "cuda" else batch, targets)
        assert images.device.type == device and images.dtype == torch.float32 and images.shape == (8, 3, 64, 64)
        outputs[device] = images.cpu()
    assert (outputs["cpu"] - outputs["cuda"]).abs().mean() < 0.05  # two JPEG decoders, half vs float resampling


CORRUPT_JPEG = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from dist_train.config import DataConfig
    from dist_train.data import EncodedImageDataset, Records
    from dist_train.decode import DeviceDecoder, collate_encoded
    from dist_train.errors import SampleError

    paths = sorted(Path(sys.argv[1]).glob("*.jpg"))
    dataset = EncodedImageDataset(Records(paths, [0, 1, 2], ["a", "b", "c"]), DataConfig(image_size=16), "resize", 0.0)
    batch, targets, _ = collate_encoded([dataset[i] for i in range(3)])
    try:
        DeviceDecoder(torch.device("cuda"), 16, 3, (0.5,) * 3, (0.5,) * 3)(batch, targets)
        print("error policy: no error")
    except SampleError as exc:
        print("error policy:", exc)
    images, targets = DeviceDecoder(torch.device("cuda"), 16, 3, (0.5,) * 3, (0.5,) * 3, "skip")(batch, targets)
    torch.cuda.synchronize()
    print("skip policy:", targets.tolist(), tuple(images.shape), bool(torch.isfinite(images).all()))
""")


def test_nvjpeg_names_a_corrupt_jpeg_or_skips_it(tmp_path):
    """nvJPEG, unlike the CPU decoder, may fail a batch in its own way: in its own process, so that a
    poisoned CUDA context cannot take the next tests with it."""
    from test_speed import photo

    for i in range(2):
        photo(i, 120, 90).save(tmp_path / f"{i}.jpg", quality=90)
    data = (tmp_path / "0.jpg").read_bytes()
    (tmp_path / "2_broken.jpg").write_bytes(data[:700] + bytes(len(data) - 700))  # a header, then zeros
    proc = subprocess.run([sys.executable, "-c", CORRUPT_JPEG, str(tmp_path)], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "error policy: cannot decode image" in proc.stdout and "2_broken.jpg" in proc.stdout, proc.stdout
    assert "skip policy: [0, 1, -2] (3, 3, 16, 16) True" in proc.stdout, proc.stdout
