"""The CUDA paths: one GPU with bf16, DDP over NCCL on 2+ GPUs, DeepSpeed ZeRO-3 on a GPU.

Skipped on machines without CUDA (like the CI machine); `python -m pytest tests/test_gpu.py` on a GPU
machine runs them (DeepSpeed there needs the wheel brought along: pip wheel --no-deps deepspeed==0.19.8).
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import config_path, read_jsonl, run_cli, tiny_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def train(digits_root, out, processes, **overrides):
    run_cli("train.py", ["--config", config_path("digits.yaml"), *tiny_overrides(digits_root, out, **overrides)], processes)
    return json.loads((out / "run_info.json").read_text()), read_jsonl(out / "metrics.jsonl")


def test_one_gpu_bf16(digits_root, tmp_path):
    info, metrics = train(digits_root, tmp_path, 1, **{"train.mixed_precision": "bf16", "train.epochs": 2})
    assert info["devices"][0].endswith("cuda") or "cuda" in info["devices"][0]
    assert metrics[-1]["val_samples"] == 270 and metrics[-1]["val_accuracy"] > 0.5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_over_nccl_on_two_gpus(digits_root, tmp_path):
    info, metrics = train(digits_root, tmp_path, 2, **{"train.mixed_precision": "bf16"})
    assert info["distributed_type"] == "DistributedType.MULTI_GPU" and info["num_processes"] == 2
    assert all(m["rank_batches"] == [20, 20] for m in metrics)
    assert len(set(info["final_weights_sha256_per_rank"])) == 1


def test_deepspeed_zero3_on_a_gpu_and_predict_from_its_weights(digits_root, tmp_path):
    pytest.importorskip("deepspeed")
    info, metrics = train(digits_root, tmp_path, 1, **{"deepspeed.enabled": "true", "deepspeed.zero_stage": 3,
                                                       "train.mixed_precision": "bf16", "model.name": "mlp"})
    assert info["distributed_type"] == "DistributedType.DEEPSPEED" and info["zero_stage"] == 3
    run_cli("predict.py", ["--config", config_path("digits.yaml"), "--checkpoint", str(tmp_path / "checkpoints" / "last"),
                           *tiny_overrides(digits_root, tmp_path, **{"model.name": "mlp"})])
    assert (tmp_path / "submission.csv").read_text().count("\n") == 271


def test_training_steps_make_no_host_sync_on_a_gpu():
    """torch's own sync detector: an epoch of fused-AdamW steps (logging off) triggers no device-to-host wait."""
    from test_speed import host_syncs_of_an_epoch

    torch.cuda.set_sync_debug_mode("warn")
    try:
        assert len(host_syncs_of_an_epoch(40, 1000, fused=True)) == len(host_syncs_of_an_epoch(5, 1000, fused=True))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_nvjpeg_decode_matches_the_cpu_decode(tmp_path):
    from test_speed import photo

    from dist_train.config import DataConfig
    from dist_train.data import EncodedImageDataset, Records
    from dist_train.decode import DeviceDecoder, collate_encoded

    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.jpg")
        photo(i, 300 + 10 * i, 200 + 5 * i).save(paths[-1], quality=90)
    cfg = DataConfig(image_size=64, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    dataset = EncodedImageDataset(Records(paths, [0] * 8, [str(i) for i in range(8)]), cfg, "random_resized_crop", 0.5)
    batch, targets, _ = collate_encoded([dataset[i] for i in range(8)])
    outputs = {}
    for device in ("cpu", "cuda"):
        decoder = DeviceDecoder(torch.device(device), cfg.image_size, 3, cfg.mean, cfg.std)
        outputs[device] = decoder(batch, targets)[0].float().cpu()
    assert (outputs["cpu"] - outputs["cuda"]).abs().mean() < 0.05  # two JPEG decoders, half vs float resampling
