"""DeepSpeed ZeRO 1/2/3 on 2 real CPU processes (gloo): sharded, equal to DDP, save/resume, consolidated weights."""
from __future__ import annotations

import json
import os

import pytest

if os.environ.get("CI") == "true":
    import deepspeed  # noqa: F401  (CI installs it: a missing DeepSpeed must fail there, not skip)
else:
    pytest.importorskip("deepspeed")

from conftest import assert_killed, config_path, read_jsonl, run_cli, tiny_overrides
from test_equivalence import EXACT, WEIGHT_TOL, max_weight_diff, train

from dist_train.commands.export import export
from dist_train.config import DeepSpeedConfig
from dist_train.errors import ConfigError
from dist_train.job.distributed import deepspeed_plugin
from dist_train.job.faults import FAULT_ENV


def ds_train(digits_root, out, stage, processes=2, **overrides):
    return train(digits_root, out, processes, **{"deepspeed.enabled": "true", "deepspeed.zero_stage": stage,
                                                 "data.batch_size": 32, **overrides})


@pytest.fixture(scope="module")
def ddp_run(digits_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, train(digits_root, out, 2, **{"data.batch_size": 32})


@pytest.fixture(scope="module")
def zero3_run(digits_root, tmp_path_factory):
    """A ZeRO-3 run, uninterrupted: the stage test's and the kill test's reference (one run, shared)."""
    out = tmp_path_factory.mktemp("zero3")
    return out, ds_train(digits_root, out, 3)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_is_sharded_and_trains_as_ddp_does(ddp_run, digits_root, tmp_path, stage, request):
    ddp_dir, ddp_metrics = ddp_run
    if stage == 3:
        tmp_path, metrics = request.getfixturevalue("zero3_run")
    else:
        metrics = ds_train(digits_root, tmp_path, stage)
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["distributed_type"] == "DistributedType.DEEPSPEED" and info["zero_stage"] == stage
    assert info["num_processes"] == 2
    assert all(m["rank_batches"] == [20, 20] and m["rank_samples"] == [640, 640] for m in metrics)
    assert all(m["val_samples"] == 270 for m in metrics)
    assert len(set(info["final_weights_sha256_per_rank"])) == 1  # every rank holds the same (gathered) weights
    diff = max_weight_diff(ddp_dir, tmp_path)  # the consolidated model.safetensors against DDP's
    print(f"ZeRO-{stage} vs DDP max weight diff: {diff:.3g}")
    assert diff <= WEIGHT_TOL
    assert [m["val_accuracy"] for m in metrics] == [m["val_accuracy"] for m in ddp_metrics]
    assert (tmp_path / "checkpoints" / "last" / "pytorch_model").is_dir()  # DeepSpeed's own sharded state


def test_zero2_with_accumulation_matches_ddp(ddp_run, digits_root, tmp_path):
    ddp_dir, _ = ddp_run
    ds_train(digits_root, tmp_path, 2, **{"data.batch_size": 16, "train.grad_accum_steps": 2})
    diff = max_weight_diff(ddp_dir, tmp_path)
    print(f"ZeRO-2 x accumulation 2 vs DDP max weight diff: {diff:.3g}")
    assert diff <= WEIGHT_TOL


def test_zero3_killed_then_resumed_equals_uninterrupted_and_predicts_from_consolidated_weights(ddp_run, zero3_run, digits_root,
                                                                                             tmp_path):
    ddp_dir, _ = ddp_run
    uninterrupted, _ = zero3_run
    args = ["--config", config_path("digits.yaml"),
            *tiny_overrides(digits_root, tmp_path / "killed", **{**EXACT, "deepspeed.enabled": "true",
                                                                 "deepspeed.zero_stage": 3, "data.batch_size": 32})]
    # the one DeepSpeed run under the real `accelerate launch` (the others are forked ranks, tests/ranks.py)
    proc = run_cli("train.py", args, processes=2, check=False, env={FAULT_ENV: "kill@epoch:1"}, timeout=300, forked=False)
    assert_killed(proc)  # rank 0 was SIGKILLed after saving epoch 1
    state = json.loads((tmp_path / "killed" / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["epoch"] == 1
    run_cli("train.py", [*args, "--resume", "auto"], processes=2)
    resumed = json.loads((tmp_path / "killed" / "run_info.json").read_text())
    full = json.loads((uninterrupted / "run_info.json").read_text())
    assert resumed["final_weights_sha256_per_rank"] == full["final_weights_sha256_per_rank"]  # bitwise
    assert [m["epoch"] for m in read_jsonl(tmp_path / "killed" / "metrics.jsonl")] == [1, 2]

    # the consolidated ZeRO-3 weights: one plain file, any number of processes, DDP's predictions
    submissions = {}
    for name, run_dir, processes in (("z3_1", uninterrupted, 1), ("z3_2", uninterrupted, 2), ("ddp", ddp_dir, 1)):
        submissions[name] = tmp_path / f"{name}.csv"
        run_cli("predict.py", ["--config", config_path("digits.yaml"), "--checkpoint",
                               str(run_dir / "checkpoints" / "last" / "model.safetensors"), "--output", str(submissions[name]),
                               *tiny_overrides(digits_root, run_dir, **EXACT)], processes=processes)
    assert submissions["z3_1"].read_bytes() == submissions["z3_2"].read_bytes() == submissions["ddp"].read_bytes()
    # and the export: from the consolidated weights, checked by onnxruntime against PyTorch
    exported = export(uninterrupted / "checkpoints" / "last", tmp_path / "z3.onnx")
    print(f"ZeRO-3 export: {exported['check']}")
    assert exported["check"]["max_abs_logit_difference"] <= 1e-4 and exported["check"]["argmax_agreement"] == 32


def test_deepspeed_json_config_is_the_base_and_must_agree(digits_root, tmp_path):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                   "zero_optimization": {"stage": 3}}))
    ds_train(digits_root, tmp_path / "run", 2, **{"deepspeed.config_file": str(ds_json), "train.epochs": 1})
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["zero_stage"] == 3
    ds_json.write_text(json.dumps({"train_micro_batch_size_per_gpu": 99}))
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=99 disagrees with dist_train's 32"):
        deepspeed_plugin(DeepSpeedConfig(enabled=True, config_file=str(ds_json)), 32, 1, 1.0, "no", 2)


def test_combinations_that_cannot_work_are_refused(digits_root, tmp_path, capsys):
    from dist_train.commands.cli import train_main

    with pytest.raises(SystemExit):
        train_main(["deepspeed.enabled=true", f"output_dir={tmp_path}"])
    assert "deepspeed.enabled=true needs a launcher" in capsys.readouterr().err
    args = ["--config", config_path("digits.yaml"), *tiny_overrides(digits_root, tmp_path / "bf16", **{
        "deepspeed.enabled": "true", "train.mixed_precision": "bf16", "train.epochs": 1})]
    proc = run_cli("train.py", args, processes=2, check=False)
    assert proc.returncode != 0
    assert "error: DeepSpeed with bf16 on CPU cannot run BatchNorm (small_cnn)" in proc.stderr


def test_find_batch_size_tells_deepspeed_the_batch_it_found(digits_root, tmp_path):
    """DeepSpeed's config is made before the batch-size search (with data.batch_size 32); the engine must run with the
    size found (the run refuses to start when DeepSpeed's micro-batch and the loaders' differ)."""
    args = ["--config", config_path("digits.yaml"), *tiny_overrides(digits_root, tmp_path, **{
        "deepspeed.enabled": "true", "deepspeed.zero_stage": 2, "data.batch_size": 32, "train.find_batch_size": "true",
        "train.epochs": 1})]
    proc = run_cli("train.py", args, processes=2, env={FAULT_ENV: "oom@find:32"})  # rank 0 cannot fit 32
    assert "train.find_batch_size: data.batch_size 32 does not fit on every rank; using 16 per process" in proc.stdout
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["per_process_batch"] == 16 and info["global_batch"] == 32
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["rank_batches"] == [40, 40]
