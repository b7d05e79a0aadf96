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
