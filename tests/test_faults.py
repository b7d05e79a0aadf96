"""Faults on real 2-process gloo runs: SIGKILL and exact resume, kills inside a save, corruption, unsafe
pickles, preemption signals, a failing or hung rank, NaN losses, unreadable images, out of memory, a full disk.

Faults are injected with DIST_TRAIN_FAULT (see dist_train/job/faults.py): `kill` is a real SIGKILL of the
process at that point, `fsize` a real kernel file-size limit, `hang` a real sleep; signals are sent from
outside with os.kill. Every run is bounded by a timeout. Where what is tested is what a fault leaves or says (the
checkpoints after a kill, an error's words), the run is forked ranks (tests/ranks.py); each fault kind keeps a test
under `accelerate launch`, and what the launcher does itself (ending the job, forwarding signals) is tested there.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import ROOT, assert_killed, command, config_path, read_jsonl, run_cli, run_env, tiny_overrides
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_train.job.faults import FAULT_ENV, FAULT_LOG_ENV, PREEMPTED_EXIT_CODE
from dist_train.rundir import checkpoint as ckpt

# 2 processes x batch 16 x accumulation 2 = global 64: 40 micro-batches per rank and 20 optimizer steps
# per epoch; dropout, augmentation and 2 loader workers, so every RNG and the loader position matter.
EXACT = {"data.batch_size": 16, "train.grad_accum_steps": 2, "data.num_workers": 2, "model.dropout": 0.2,
         "data.train_augment": "[{name: RandomAffine, degrees: 10, translate: [0.1, 0.1]}]",
         "train.deterministic": "true", "checkpoint.every_n_steps": 7, "checkpoint.keep_last": 3}
STEPS = 40  # 2 epochs


def args(digits_root, out, **overrides) -> list[str]:
    return ["--config", config_path("digits.yaml"), *tiny_overrides(digits_root, out, **{**EXACT, **overrides})]


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """A TensorBoard series as TensorBoard shows it: what a resumed run purged is gone."""
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}, purge_orphaned_data=True)
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("samples_per_sec", "epoch_seconds", "data_wait_fraction")} for r in records]


def assert_workers_exited(proc, code: int) -> None:
    """The launcher exits 1 whenever a worker fails; the workers' own codes are in its report (forked ranks: in
    `rank_codes`, tests/ranks.py)."""
    assert proc.returncode != 0
    if hasattr(proc, "rank_codes"):
        codes = set(proc.rank_codes) - {0}
    else:
        codes = {int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)}
    # a peer still exiting when the launcher tears the job down may show the launcher's SIGTERM
    assert code in codes and codes <= {code, -signal.SIGTERM}, (codes, proc.stderr[-3000:])


def assert_same_run(ref: Path, run: Path) -> None:
    """Bitwise: final weights and optimizer state on both ranks, every step's loss and LR, every evaluation."""
    a, b = (json.loads((d / "run_info.json").read_text()) for d in (ref, run))
    assert len(set(a["final_weights_sha256_per_rank"])) == 1
    assert b["final_weights_sha256_per_rank"] == a["final_weights_sha256_per_rank"]
    assert b["final_optimizer_sha256_per_rank"] == a["final_optimizer_sha256_per_rank"]
    for tag in ("train/loss", "train/lr", "train/grad_norm"):
        ours, theirs = scalars(run, tag), scalars(ref, tag)
        assert [s for s, _ in theirs] == list(range(1, STEPS + 1))
        assert ours == theirs, tag
    ours, theirs = without_timings(read_jsonl(run / "metrics.jsonl")), without_timings(read_jsonl(ref / "metrics.jsonl"))
    for record in ours + theirs:  # summed over ranks in another order when an epoch was resumed midway
        record["train_loss"] = pytest.approx(record["train_loss"], rel=1e-12)
    assert ours == theirs


@pytest.fixture(scope="module")
def uninterrupted(digits_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_cli("train.py", args(digits_root, out), processes=2)
    return out


# ----------------------------------------------------------------------------------------------
# exact resume


# What is tested here is what a kill leaves for the resume: one case runs under `accelerate launch` (which ends the
# job when rank 0 dies), the others as forked ranks (tests/ranks.py: rank 1 ends itself, naming the lost rank 0).
@pytest.mark.parametrize("fault,resumed_at,launched", [
    ("kill@step:10", 7, True),     # mid-epoch: the periodic save at step 7 (14 micro-batches into epoch 1)
    ("kill@epoch:1", 20, False),   # right after the end-of-epoch save
    ("kill@batch:31", 14, False),  # between the two micro-batches of step 16's accumulation window
], ids=["mid_epoch", "epoch_boundary", "inside_accumulation_window"])
def test_sigkill_then_resume_is_bitwise_the_uninterrupted_run(uninterrupted, digits_root, tmp_path, fault, resumed_at,
                                                              launched):
    killed = run_cli("train.py", args(digits_root, tmp_path), processes=2, check=False, env={FAULT_ENV: fault},
                     forked=not launched)
    assert_killed(killed)
    assert not (tmp_path / "run_info.json").read_text().count("finished")
    resumed = run_cli("train.py", [*args(digits_root, tmp_path), "--resume", "auto"], processes=2)
    assert f"resumed from {tmp_path / 'checkpoints' / ckpt.checkpoint_name(resumed_at)}" in resumed.stdout
    assert_same_run(uninterrupted, tmp_path)


# ----------------------------------------------------------------------------------------------
# kills inside a save


@pytest.mark.parametrize("phase,survivor", [
    ("written", 7),     # every file of step 14 written, not yet fsynced or sealed
    ("fsynced", 7),     # files fsynced, the manifest not yet there
    ("sealed", 7),      # manifest written, directory not yet renamed into place
    ("renamed", 14),    # in place and complete, `last` still pointing at the old one
    ("rotating", 14),   # keep_last=1: step 7 renamed for deletion, not yet deleted
])
def test_sigkill_inside_a_save_keeps_the_latest_complete_checkpoint(digits_root, tmp_path, phase, survivor):
    """What the kill leaves on disk: forked ranks, but for one phase under `accelerate launch`."""
    run = args(digits_root, tmp_path, **{"checkpoint.keep_last": 1, "train.epochs": 1})
    killed = run_cli("train.py", run, processes=2, check=False, env={FAULT_ENV: f"kill@save-{phase}:14"},
                     forked=phase != "sealed")
    assert_killed(killed)
    checkpoints = tmp_path / "checkpoints"
    complete = ckpt.complete_checkpoints(checkpoints)
    assert complete[0].name == ckpt.checkpoint_name(survivor)
    ckpt.verify(complete[0])
    if phase in ("written", "fsynced", "sealed", "rotating"):
        assert list(checkpoints.glob(".tmp-*")), "the kill should have left a temporary behind"

    resumed = run_cli("train.py", [*run, "--resume", "auto"], processes=2)
    assert f"resumed from {checkpoints / ckpt.checkpoint_name(survivor)}" in resumed.stdout
    if phase in ("written", "fsynced", "sealed", "rotating"):
        assert "left by a job that died while saving" in resumed.stdout
    assert not list(checkpoints.glob(".tmp-*")) and not list(checkpoints.glob(".*.tmp"))
    kept = [p.name for p in ckpt.complete_checkpoints(checkpoints)]
    assert kept == [ckpt.checkpoint_name(20)]  # keep_last=1, and `best` is the same one
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["global_step"] == 20 and len(set(info["final_weights_sha256_per_rank"])) == 1


# ----------------------------------------------------------------------------------------------
# corruption and unsafe pickles


@pytest.fixture
def finished_copy(uninterrupted, tmp_path):
    """A copy of the finished run (checkpoints at steps 28, 35, 40 kept), to damage."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out, symlinks=True)
    return out


def test_flipped_or_truncated_files_are_named_and_auto_resume_falls_back(finished_copy, digits_root):
    checkpoints = finished_copy / "checkpoints"
    newest, previous = ckpt.complete_checkpoints(checkpoints)[:2]
    optimizer_file = newest / "optimizer.bin"
    data = bytearray(optimizer_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer_file.write_bytes(bytes(data))
    run = args(digits_root, finished_copy)
    explicit = run_cli("train.py", [*run, "--resume", str(newest)], processes=2, check=False)
    assert_workers_exited(explicit, 2)
    assert f"error: checkpoint {newest}: file optimizer.bin is corrupt (sha256 mismatch)" in explicit.stderr

    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "model.safetensors is truncated or altered (100 bytes" in run_cli(
        "predict.py", [*run, "--checkpoint", str(newest)], check=False).stderr

    auto = run_cli("train.py", [*run, "--resume", "auto"], processes=2)
    assert f"warning: checkpoint {newest}: file model.safetensors is truncated or altered" in auto.stdout
    assert "falling back to an older checkpoint" in auto.stdout
    assert f"resumed from {previous}" in auto.stdout
    info = json.loads((finished_copy / "run_info.json").read_text())
    assert info["global_step"] == STEPS and info["resumed_from"] == str(previous)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/dist_train_pwned",))


def test_a_pickle_carrying_code_is_refused_naming_the_global(finished_copy, digits_root):
    newest = ckpt.complete_checkpoints(finished_copy / "checkpoints")[0]
    with open(newest / "random_states_1.pkl", "wb") as f:
        pickle.dump({"step": 0, "random_state": Exploit()}, f)
    ckpt.write_manifest(newest)  # re-sealed, as an attacker would: only the pickle check stands in the way
    marker = Path("/tmp/dist_train_pwned")
    marker.unlink(missing_ok=True)
    proc = run_cli("train.py", [*args(digits_root, finished_copy), "--resume", str(newest)], processes=2, check=False)
    assert_workers_exited(proc, 2)
    assert "random_states_1.pkl would import posix.system; refused to load" in proc.stderr
    assert not marker.exists()


def test_no_load_in_the_package_can_fall_back_to_unsafe_unpickling():
    sources = "\n".join(p.read_text() for p in (ROOT / "dist_train").glob("*.py"))
    assert "weights_only=False" not in sources and "pickle.load(" not in sources
    assert "yaml.load(" not in sources and "yaml.unsafe_load" not in sources


# ----------------------------------------------------------------------------------------------
# preemption


def workers(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The training processes under an `accelerate launch`, by rank (not their data-loader workers)."""
    found = {}
    for child in launcher.children(recursive=True):
        try:
            if "launch" not in child.cmdline() and "launch" in child.parent().cmdline():  # the agent's children
                found[int(child.environ()["RANK"])] = child
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.parametrize("target,sig", [("rank1", signal.SIGUSR1), ("launcher", signal.SIGTERM)])
def test_preemption_signal_saves_requeues_and_the_restart_finishes_the_same(uninterrupted, digits_root, tmp_path, target, sig):
    """SLURM warns with SIGUSR1 (to a task) or SIGTERM (to the step): every rank agrees at the next step,
    saves, exits with code 75, and `scontrol requeue $SLURM_JOB_ID` is called (a stand-in records it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    out = tmp_path / "run"
    run = args(digits_root, out, **{"checkpoint.check_every_n_steps": 1})
    env = run_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    job = subprocess.Popen(command("train.py", run, 2), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / ckpt.checkpoint_name(7)).exists():
            assert job.poll() is None and time.time() < deadline, "the run ended before the signal"
            time.sleep(0.02)
        launcher = psutil.Process(job.pid)
        (workers(launcher)[1] if target == "rank1" else launcher).send_signal(sig)
        stdout, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            for proc in [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]:
                proc.kill()
    assert job.returncode != 0
    if target == "rank1":  # the launcher, itself signalled, does not report its workers' codes
        assert_workers_exited(subprocess.CompletedProcess([], job.returncode, stdout, stderr), PREEMPTED_EXIT_CODE)
    assert "preempted: a preemption signal reached the job; saved" in stderr
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    saved = ckpt.complete_checkpoints(out / "checkpoints")[0]
    step = int(saved.name.split("-")[1])
    assert 7 < step < STEPS
    ckpt.verify(saved)

    # the requeued job runs the same command again; SLURM_RESTART_COUNT makes it continue
    resumed = run_cli("train.py", run, processes=2, env={"SLURM_RESTART_COUNT": "1"})
    assert "SLURM_RESTART_COUNT=1: continuing with --resume auto" in resumed.stdout
    assert f"resumed from {saved}" in resumed.stdout
    assert_same_run(uninterrupted, out)


# ----------------------------------------------------------------------------------------------
# never hang, never hide


def launched_with_fault(digits_root, out: Path, fault: str, **overrides) -> tuple[subprocess.CompletedProcess, float]:
    """The job on 2 processes under the real launcher, with `fault` planned; returns it and the seconds from the
    fault firing to the job's end (not from the launch: start-up is most of a test's time, and varies with the
    machine, the stop does not)."""
    log = out.with_name(out.name + ".faults")
    proc = run_cli("train.py", args(digits_root, out, **overrides), processes=2, check=False, timeout=180,
                   env={FAULT_ENV: fault, FAULT_LOG_ENV: str(log)}, forked=False)
    ended = time.time()
    fired = log.read_text().splitlines() if log.exists() else []
    assert len(fired) == 1 and fired[0].endswith(" " + fault), (fired, proc.stderr[-3000:])
    stop_s = ended - float(fired[0].split()[0])
    print(f"{fault}: the job ended {stop_s:.1f} s after it")
    return proc, stop_s


def test_a_rank_that_raises_stops_the_job_at_once_naming_it_once(digits_root, tmp_path):
    proc, stop_s = launched_with_fault(digits_root, tmp_path, "raise@step:3#1")
    assert proc.returncode != 0 and stop_s < 15, stop_s  # measured: 2.7 s, the launcher's end included
    assert proc.stderr.count("injected failure at step:3") == 1
    assert "error: rank 1 of 2 failed: RuntimeError: injected failure at step:3" in proc.stderr
    assert "rank 0: stopping: lost contact with another rank" in proc.stderr


def test_a_rank_killed_without_a_word_is_named_by_its_peer(digits_root, tmp_path):
    """SIGKILL of rank 1 (no error of its own to print): rank 0 names it, and the launcher's SIGTERM does not cut
    that report short."""
    proc, stop_s = launched_with_fault(digits_root, tmp_path, "kill@step:5#1")
    assert proc.returncode != 0 and stop_s < 20, stop_s  # measured: 4.1 s
    assert re.search(r"rank 0: stopping: lost contact with rank 1 \(machine 0 on host [^)]+\), which stopped without a "
                     r"word: killed, or its machine was lost", proc.stderr), proc.stderr[-3000:]


def test_a_hung_rank_is_named_and_the_job_ends_within_the_timeout(digits_root, tmp_path):
    proc, stop_s = launched_with_fault(digits_root, tmp_path, "hang@step:3#1", **{"train.distributed_timeout_s": 6})
    assert proc.returncode != 0
    # the timeout, the watchdog's polling (1.5 s here) and the peers' reports (5 s): measured 13.4 s
    assert stop_s < 6 + 24, stop_s
    assert "error: rank 1 made no progress for" in proc.stderr and "it is hung" in proc.stderr
    assert 'dist_train/job/faults.py", line' in proc.stderr  # where it hung
    assert "rank 0: stopping: waited" in proc.stderr and "for rank(s) 1" in proc.stderr
    assert proc.stderr.count("it is hung") == 1
    assert not (tmp_path / ".lock").exists()


def test_a_hung_main_process_releases_the_run_lock(digits_root, tmp_path):
    """Rank 0 holds the run directory's lock; hung, its main thread never reaches `finally`: the watchdog releases
    the lock before it ends the process, so that the requeued or next run starts at once (not refused, not 60 s)."""
    proc, _ = launched_with_fault(digits_root, tmp_path, "hang@step:3#0", **{"train.distributed_timeout_s": 6})
    assert proc.returncode != 0 and "error: rank 0 made no progress for" in proc.stderr
    assert not (tmp_path / ".lock").exists(), proc.stderr[-2000:]


def finite_checkpoints(checkpoints: Path) -> list[str]:
    names = []
    for directory in ckpt.complete_checkpoints(checkpoints):
        weights = load_file(str(directory / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), directory
        names.append(directory.name)
    return names


def test_nan_on_one_rank_is_skipped_by_every_rank(digits_root, tmp_path):
    run_cli("train.py", args(digits_root, tmp_path, **{"train.epochs": 1}), processes=2,
            env={FAULT_ENV: "nan@step:3#1,nanloss@step:9#1"})
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["skipped_steps"] == 2 and info["global_step"] == 20
    assert len(set(info["final_weights_sha256_per_rank"])) == 1
    assert finite_checkpoints(tmp_path / "checkpoints")
    losses = dict(scalars(tmp_path, "train/loss"))
    assert torch.isnan(torch.tensor(losses[3])) and all(torch.isfinite(torch.tensor(v)) for s, v in losses.items() if s not in (3, 9))


def test_consecutive_nan_steps_stop_the_run_naming_the_step(digits_root, tmp_path):
    proc = run_cli("train.py", args(digits_root, tmp_path, **{"train.max_bad_steps": 3}), processes=2, check=False,
                   env={FAULT_ENV: "nan@step:8#1,nan@step:9#1,nan@step:10#1"})
    assert_workers_exited(proc, 2)
    assert "error: steps 8-10: 3 optimizer steps in a row had a non-finite loss or gradient (train.max_bad_steps=3); " \
           "stopped at step 10" in proc.stderr
    assert finite_checkpoints(tmp_path / "checkpoints") == [ckpt.checkpoint_name(7)]


def test_nonfinite_stop_ends_the_run_at_the_first_bad_step(digits_root, tmp_path):
    proc = run_cli("train.py", args(digits_root, tmp_path, **{"train.nonfinite": "stop"}), processes=2, check=False,
                   env={FAULT_ENV: "nan@step:9#0"}, forked=False)
    assert_workers_exited(proc, 2)
    assert "error: step 9: the loss or gradient is not finite on some rank (train.nonfinite=stop); stopped." in proc.stderr
    assert finite_checkpoints(tmp_path / "checkpoints") == [ckpt.checkpoint_name(7)]


def test_a_failing_single_process_run_exits(digits_root, tmp_path):
    """`python train.py` with loader workers (which ignore SIGTERM): a crash ends the process, not a hang."""
    proc = run_cli("train.py", args(digits_root, tmp_path), processes=1, check=False, timeout=120,
                   env={FAULT_ENV: "raise@step:2"}, forked=False)
    assert proc.returncode == 1 and "injected failure at step:2" in proc.stderr


def test_non_finite_weights_are_never_saved(digits_root, tmp_path):
    """With the per-step check off, a NaN reaches the weights; the save refuses to write them."""
    proc = run_cli("train.py", args(digits_root, tmp_path, **{"train.nonfinite": "ignore"}), processes=2, check=False,
                   env={FAULT_ENV: "nan@step:10#1"})
    assert_workers_exited(proc, 2)
    assert f"error: refusing to save non-finite weights at step 14; the last checkpoint written " \
           f"({tmp_path / 'checkpoints' / ckpt.checkpoint_name(7)}) is intact" in proc.stderr
    assert finite_checkpoints(tmp_path / "checkpoints") == [ckpt.checkpoint_name(7)]


# ----------------------------------------------------------------------------------------------
# unreadable images


@pytest.fixture(scope="module")
def broken_images(digits_root, tmp_path_factory):
    """The digits with one truncated JPEG and one zero-byte file among the training images."""
    import csv

    from PIL import Image

    root = tmp_path_factory.mktemp("broken")
    with open(digits_root / "train.csv") as f:
        rows = list(csv.DictReader(f))
    truncated, empty = root / "truncated.jpg", root / "empty.png"
    Image.open(digits_root / rows[10]["image"]).convert("RGB").resize((64, 64)).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:300])
    empty.write_bytes(b"")
    rows[10]["image"], rows[500]["image"] = str(truncated), str(empty)
    with open(root / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "image", "label"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in ("id", "image", "label")} for r in rows)
    overrides = {"data.train": str(root / "train.csv"), "data.image_root": str(digits_root),
                 "data.val": str(digits_root / "val.csv"), "train.epochs": 1, "checkpoint.every_n_steps": "null"}
    return overrides, (10, truncated), (500, empty)


def test_unreadable_image_is_an_error_naming_file_and_index(broken_images, digits_root, tmp_path):
    overrides = broken_images[0]
    proc = run_cli("train.py", args(digits_root, tmp_path, **overrides), processes=2, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: rank ")]
    assert lines, proc.stderr[-3000:]
    named = [f"train sample {i}: cannot read image {p} (" for i, p in broken_images[1:]]
    assert all(any(n in line for n in named) and line.endswith("set data.bad_samples=skip") for line in lines), lines


def test_unreadable_images_are_skipped_counted_and_ranks_stay_in_step(broken_images, digits_root, tmp_path):
    overrides, (i1, p1), (i2, p2) = broken_images
    proc = run_cli("train.py", args(digits_root, tmp_path, **{**overrides, "data.bad_samples": "skip"}), processes=2)
    assert f"warning: train sample {i1}: cannot read image {p1}" in proc.stderr
    assert f"warning: train sample {i2}: cannot read image {p2}" in proc.stderr
    assert "epoch 1: skipped 2 unreadable training images" in proc.stdout
    info = json.loads((tmp_path / "run_info.json").read_text())
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert info["skipped_samples"] == 2 and metrics[0]["skipped_samples"] == 2
    assert metrics[0]["rank_batches"] == [40, 40] and info["global_step"] == 20
    assert len(set(info["final_weights_sha256_per_rank"])) == 1
    assert scalars(tmp_path, "data/skipped_samples") == [(20, 2.0)]


# ----------------------------------------------------------------------------------------------
# out of memory, a full disk


def test_out_of_memory_names_the_rank_batch_and_what_to_do(digits_root, tmp_path):
    proc = run_cli("train.py", args(digits_root, tmp_path), processes=2, check=False, env={FAULT_ENV: "oom@step:2#1"})
    assert proc.returncode != 0
    assert "error: rank 1: out of memory on cpu:0 with data.batch_size=16 per process (global batch 64)" in proc.stderr
    assert "raise train.grad_accum_steps to keep the global batch" in proc.stderr


def test_batch_size_finder_agrees_on_one_size_across_ranks(digits_root, tmp_path):
    proc = run_cli("train.py", args(digits_root, tmp_path, **{"train.find_batch_size": "true", "train.epochs": 1,
                                                              "data.batch_size": 32}),
                   processes=2, env={FAULT_ENV: "oom@find:32#1,oom@find:16#1"})
    assert "train.find_batch_size: data.batch_size 32 does not fit on every rank; using 8 per process" in proc.stdout
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["per_process_batch"] == 8 and info["global_batch"] == 8 * 2 * 2
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["rank_batches"] == [79, 79]  # ceil(ceil(1257 / 8) / 2)


def test_a_failed_write_leaves_the_previous_checkpoint_and_resume_works(uninterrupted, digits_root, tmp_path):
    """A real file-size limit (RLIMIT_FSIZE, EFBIG) on rank 0 from step 18: the save at step 20 fails."""
    run = args(digits_root, tmp_path)
    proc = run_cli("train.py", run, processes=2, check=False, env={FAULT_ENV: "fsize=100000@step:18"})
    assert_workers_exited(proc, 2)
    checkpoints = tmp_path / "checkpoints"
    assert f"error: cannot write checkpoint {checkpoints / ckpt.checkpoint_name(20)} (rank 0: " in proc.stderr
    assert "File too large" in proc.stderr
    assert f"the previous checkpoint ({checkpoints / ckpt.checkpoint_name(14)}) is intact" in proc.stderr
    assert [p.name for p in ckpt.complete_checkpoints(checkpoints)][0] == ckpt.checkpoint_name(14)
    assert not list(checkpoints.glob(".tmp-*"))
    run_cli("train.py", [*run, "--resume", "auto"], processes=2)
    assert_same_run(uninterrupted, tmp_path)


def test_periodic_saves_by_minutes_are_decided_by_rank_0_for_all(digits_root, tmp_path):
    run_cli("train.py", args(digits_root, tmp_path, **{"train.epochs": 1, "checkpoint.every_n_steps": "null",
                                                      "checkpoint.every_n_minutes": 1e-6, "checkpoint.keep_last": 30,
                                                      "checkpoint.check_every_n_steps": 4}), processes=2)
    steps = sorted(int(p.name.split("-")[1]) for p in ckpt.complete_checkpoints(tmp_path / "checkpoints"))
    assert steps == [4, 8, 12, 16, 20]  # checked every 4 steps, always due; 20 is the epoch's own save
