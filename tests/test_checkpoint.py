"""Checkpoint bookkeeping on disk, in one process: manifests, verification, rotation, stale temporaries; and a
checkpoint written before the loop's reshape resumes today, bitwise (2 processes)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import config_path, read_jsonl, run_cli, run_env

from dist_train.errors import CheckpointError, SampleError
from dist_train.models.networks import read_weights
from dist_train.rundir import checkpoint as ckpt
from dist_train.rundir.weights import state_digest

OLD_CHECKPOINT = Path(__file__).parent / "fixtures" / "checkpoint-before-reshape"


def sealed(checkpoints, step, payload=b"weights"):
    directory = checkpoints / ckpt.checkpoint_name(step)
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(payload * 100)
    (directory / "sub").mkdir()
    (directory / "sub" / "shard.pt").write_bytes(b"x" * 10)
    ckpt.write_manifest(directory)
    return directory


def test_manifest_lists_every_file_and_verify_names_the_damaged_one(tmp_path):
    directory = sealed(tmp_path, 10)
    manifest = json.loads((directory / ckpt.MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {"model.safetensors", "sub/shard.pt"}
    ckpt.verify(directory)
    ckpt.write_manifest(directory)  # re-sealing does not list the manifest itself
    ckpt.verify(directory)
    data = bytearray((directory / "model.safetensors").read_bytes())
    data[3] ^= 1
    (directory / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="file model.safetensors is corrupt"):
        ckpt.verify(directory)
    ckpt.verify(directory, only=["sub/shard.pt"])
    data[3] ^= 1
    (directory / "model.safetensors").write_bytes(bytes(data))
    (directory / "sub" / "shard.pt").unlink()
    with pytest.raises(CheckpointError, match="file sub/shard.pt is missing"):
        ckpt.verify(directory)
    (directory / ckpt.MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="is not a complete checkpoint"):
        ckpt.verify(directory)


def test_rotation_keeps_the_newest_and_the_linked_ones(tmp_path):
    for step in (10, 20, 30, 40):
        sealed(tmp_path, step)
    ckpt.point(tmp_path / "best", ckpt.checkpoint_name(10))
    ckpt.point(tmp_path / "last", ckpt.checkpoint_name(40))
    ckpt.rotate(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-00000040", "step-00000030", "step-00000010"]
    assert os.readlink(tmp_path / "best") == "step-00000010" and not list(tmp_path.glob(".tmp-*"))


def test_stale_temporaries_and_unsealed_directories_are_cleaned(tmp_path):
    sealed(tmp_path, 10)
    (tmp_path / ".tmp-step-00000020").mkdir()
    (tmp_path / ".tmp-delete-step-00000005").mkdir()
    (tmp_path / "step-00000030").mkdir()  # not ours to trust: no manifest
    os.symlink("step-00000010", tmp_path / ".last.tmp")
    removed = ckpt.clean_stale(tmp_path)
    assert sorted(removed) == sorted([".tmp-step-00000020", ".tmp-delete-step-00000005", ".last.tmp", "step-00000030"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010"]


def test_resume_auto_takes_the_newest_intact_checkpoint_and_says_which_it_skipped(tmp_path):
    older, newer = sealed(tmp_path, 10), sealed(tmp_path, 20)
    (newer / "model.safetensors").write_bytes(b"short")
    said = []
    assert ckpt.resolve_resume("auto", tmp_path, log=said.append) == older
    assert "model.safetensors is truncated or altered (5 bytes" in said[0] and "falling back" in said[0]
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_resume("auto", tmp_path / "nothing")


def test_an_error_reraised_by_a_loader_worker_prints_its_own_message():
    reraised = SampleError("Caught SampleError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
                           '  File "x.py", line 1, in f\ndist_train.errors.SampleError: train sample 3: cannot read image a.png')
    assert reraised.message() == "train sample 3: cannot read image a.png" and reraised.rank_local


@pytest.mark.slow  # two 2-process runs (and no part of make gpu-check's fast CPU tests: 2 ranks on one GPU)
def test_a_checkpoint_from_before_the_reshape_loads_exactly_and_resumes_as_todays_format(digits_root, tmp_path):
    """tests/fixtures/README.md: step 5 of a 2-process run with EMA, saved by the code before build/engine/Checkpointer.
    Portable across CPUs (an AVX-512 machine computes other last bits than the one that wrote it): today's code loads
    it into exactly the state it holds (model, EMA, optimizer, schedule, RNG, position) and saves that state again in
    today's format; resumed, the old checkpoint and today's copy end bit for bit alike, on this machine."""
    args = [f"data.root={digits_root}", "data.image_size=8", "data.num_workers=0", "model.name=mlp", "model.width=8",
            "train.epochs=2", "train.ema_decay=0.9", "checkpoint.every_n_steps=5", "checkpoint.keep_last=100"]
    todays = tmp_path / "todays"
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "resave_checkpoint.py"), str(OLD_CHECKPOINT),
                           str(todays), config_path("digits.yaml"), *args], env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    parts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {part: equal for part, equal in parts.items() if part != "written"} == dict.fromkeys(
        ["model", "ema", "optimizer", "schedule", "torch_rng", "position", "resaved_model", "resaved_ema",
         "resaved_optimizer", "resaved_schedule", "resaved_rng", "resaved_trainer_state"], True)
    old = tmp_path / "old"
    shutil.copytree(OLD_CHECKPOINT, old / "checkpoints" / "step-00000005")
    ends = []
    for directory in (old, todays):
        proc = run_cli("train.py", ["--config", config_path("digits.yaml"), *args, f"output_dir={directory}",
                                    "--resume", "auto"], processes=2)
        assert f"resumed from {directory / 'checkpoints' / 'step-00000005'}: epoch 1, batch 5, step 5" in proc.stdout
        ends.append(json.loads((directory / "run_info.json").read_text()))
    assert ends[0]["global_step"] == ends[1]["global_step"] > 5
    assert ends[0]["final_weights_sha256_per_rank"] == ends[1]["final_weights_sha256_per_rank"]
    assert ends[0]["final_optimizer_sha256_per_rank"] == ends[1]["final_optimizer_sha256_per_rank"]
    ema = [state_digest(read_weights(d / "checkpoints" / "last" / ckpt.EMA_FILE)) for d in (old, todays)]
    assert ema[0] == ema[1]
    timing = {"samples_per_sec", "epoch_seconds", "data_wait_fraction"}
    lines = [[{k: v for k, v in line.items() if k not in timing} for line in read_jsonl(d / "metrics.jsonl")] for d in (old, todays)]
    assert len(lines[0]) == 2 and lines[0] == lines[1]


def _write_many(path: str, text: str, times: int) -> None:
    from dist_train.rundir.files import write_text_atomic
    for _ in range(times):
        write_text_atomic(Path(path), text)


def test_two_processes_writing_one_file_at_once_each_replace_it_whole(tmp_path):
    """As two tasks of a job array write the CV run's config.yaml: neither fails (a fixed temporary name made one
    find its temporary renamed away by the other), the file is one of the two texts whole, and no temporary is left."""
    import multiprocessing
    texts = ["a" * 100_000, "b" * 50_000]
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_many, args=(str(tmp_path / "config.yaml"), text, 300)) for text in texts]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
    assert [w.exitcode for w in writers] == [0, 0]
    assert (tmp_path / "config.yaml").read_text() in texts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    assert oct((tmp_path / "config.yaml").stat().st_mode & 0o777) == oct(0o644 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
