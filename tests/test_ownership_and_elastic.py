"""A run directory has one owner (runlock.py), and a run resumes on another number of processes (elastic.py).

Unit tables for the lock's judgement and the resumption plan, then real runs: two jobs started together on one
directory, a SIGKILLed run's lock taken over, the lock released after success, error and preemption; 2 -> 1 and
1 -> 2 processes against runs that stayed put (the MLP of test_equivalence: weights within its tolerance, the LR
of every step equal), an indivisible change refused and then adapted, a mid-epoch checkpoint refused.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace

import pytest
from conftest import assert_killed, command, config_path, read_jsonl, run_cli, run_env, tiny_overrides
from test_distributed import scalars
from test_equivalence import EXACT, WEIGHT_TOL, max_weight_diff

from dist_train.errors import ConfigError
from dist_train.job.faults import FAULT_ENV, PREEMPTED_EXIT_CODE
from dist_train.job.layout import Layout
from dist_train.loop import elastic
from dist_train.rundir.runlock import LOCK_FILE, STALE_AFTER_S, Holder, RunLock

EPOCHS = 3

# ----------------------------------------------------------------------------------------------
# the lock's judgement


def write_lock(directory, holder: Holder, age_s: float = 0.0):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    path.write_text(json.dumps(asdict(holder)))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_a_lock_is_exclusive_and_released_only_by_its_holder(tmp_path):
    first, second = RunLock(tmp_path / "run"), RunLock(tmp_path / "run")
    assert first.acquire() is None
    record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] and "started" in record
    second.release()  # never held it: the lock stays
    assert (tmp_path / "run" / LOCK_FILE).exists()
    first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_the_lock_appears_whole_and_leaves_nothing_staged(tmp_path, monkeypatch):
    """A run arriving at the same moment must never read the lock half written (it would be refused as
    'unreadable', not told whose run it is): the lock comes into being by a link of a file already complete."""
    from dist_train.rundir import runlock

    seen, link = [], os.link

    def watched_link(source, target):
        seen.append((json.loads(open(source).read()), os.path.exists(target)))
        return link(source, target)

    monkeypatch.setattr(runlock.os, "link", watched_link)
    lock = RunLock(tmp_path)
    assert lock.acquire() is None
    assert seen == [(asdict(lock.holder), False)]
    with pytest.raises(FileExistsError):  # a second creator loses, as with O_EXCL
        RunLock(tmp_path)._create(Holder.this_process())
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # no staged copy left by either
    lock.release()


def test_without_hard_links_the_lock_is_created_exclusively_all_the_same(tmp_path, monkeypatch):
    """Some network and FUSE file systems refuse hard links: the lock is then created with O_EXCL, holds the
    whole record, and a second creator still loses."""
    from dist_train.rundir import runlock

    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(runlock.os, "link", no_links)
    lock = RunLock(tmp_path)
    assert lock.acquire() is None
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == asdict(lock.holder)
    with pytest.raises(FileExistsError):
        RunLock(tmp_path)._create(Holder.this_process())
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_live_process_on_this_host_keeps_its_lock(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = Holder.this_process()
        write_lock(tmp_path, replace(me, pid=sleeper.pid, pid_started=None, started="2026-11-28 08:00:00 UTC"))
        with pytest.raises(ConfigError, match=rf"^{tmp_path} is in use by a run started 2026-11-28 08:00:00 UTC "
                                              rf"\(pid {sleeper.pid} on host {me.host}\); choose another output_dir, or wait$") as held:
            RunLock(tmp_path).acquire()
        # whose, without the advice to a run (a study's worker waits instead: hpo.Study.locked)
        assert held.value.in_use == f"{tmp_path} is in use by a run started 2026-11-28 08:00:00 UTC (pid {sleeper.pid} on host {me.host})"
    finally:
        sleeper.kill()
        sleeper.wait()
    note = RunLock(tmp_path).acquire()  # now its holder is gone
    assert note.startswith(f"took over {tmp_path / LOCK_FILE} from a run started") and f"pid {sleeper.pid} is no longer running" in note


@pytest.mark.parametrize("case,taken", [
    ("other host, fresh", False),
    ("other host, silent", True),
    ("reused pid", True),
    ("same SLURM job, earlier restart", True),
    ("other SLURM job on another host, fresh", False),
    ("unreadable, fresh", False),
    ("unreadable, old", True),
])
def test_who_may_take_over_a_lock(tmp_path, monkeypatch, case, taken):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    me = Holder.this_process()
    if case == "other host, fresh":
        write_lock(tmp_path, replace(me, host="elsewhere", slurm_job=None))
    elif case == "other host, silent":
        write_lock(tmp_path, replace(me, host="elsewhere", slurm_job=None), age_s=STALE_AFTER_S + 5)
    elif case == "reused pid":  # this very pid, but started at another time: another process
        write_lock(tmp_path, replace(me, pid=os.getppid(), pid_started="1", slurm_job=None))
    elif case == "same SLURM job, earlier restart":
        write_lock(tmp_path, replace(me, host="elsewhere", slurm_restart=0))
    elif case == "other SLURM job on another host, fresh":
        write_lock(tmp_path, replace(me, host="elsewhere", slurm_job="17", slurm_restart=3))
    else:
        (tmp_path / LOCK_FILE).write_text("{not json")
        age = STALE_AFTER_S + 5 if case.endswith("old") else 0
        os.utime(tmp_path / LOCK_FILE, (time.time() - age, time.time() - age))
    lock = RunLock(tmp_path)
    if taken:
        assert lock.acquire().startswith(f"took over {tmp_path / LOCK_FILE}")
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        lock.release()
    else:
        with pytest.raises(ConfigError, match="is in use by"):
            lock.acquire()


# ----------------------------------------------------------------------------------------------
# the resumption plan


def layout(p, b, a):
    return Layout(p, b, a, 1257)


def at_epoch_end(p, b, a, epochs=2):
    return elastic.Saved(Layout(p, b, a), epochs, mid_epoch=False)


@pytest.mark.parametrize("saved,now,elastic_mode,accum,rescale", [
    ((2, 32, 1), (2, 32, 1), "keep", 1, False),
    ((2, 32, 1), (1, 32, 1), "keep", 2, False),
    ((1, 32, 2), (2, 32, 2), "keep", 1, False),   # other processes: the configured accumulation gives way
    ((8, 32, 1), (4, 32, 1), "keep", 2, False),
    ((4, 16, 2), (8, 16, 1), "keep", 1, False),
    ((2, 32, 1), (1, 16, 1), "keep", 4, False),   # and a new per-process batch: the global batch is kept too
    ((2, 32, 1), (3, 32, 1), "adapt", 1, True),
    ((2, 32, 1), (4, 32, 1), "adapt", 1, True),   # 64 cannot be made of 4 x 32
    ((2, 32, 1), (1, 32, 1), "adapt", 2, False),  # adapt only where keeping is impossible
    ((2, 32, 1), (2, 32, 2), "keep", 2, True),    # the same processes: the config's new accumulation is the user's
    ((2, 32, 2), (2, 16, 4), "keep", 4, False),   # ... another split of the same global batch: nothing to rescale
    ((2, 32, 1), (2, 48, 1), "keep", 1, True),
])
def test_the_resumption_plan(saved, now, elastic_mode, accum, rescale):
    plan = elastic.plan(at_epoch_end(*saved), layout(*now), elastic=elastic_mode)
    assert (plan.now.accum, plan.rescale) == (accum, rescale)
    if not rescale:
        assert plan.now.global_batch == layout(*saved).global_batch
        assert plan.now.with_samples(1257).steps_per_epoch == layout(*saved).steps_per_epoch
    assert plan.changed == (saved != (now[0], now[1], accum))


def test_refusals_of_the_plan():
    with pytest.raises(ConfigError, match=r"global batch 64 .* 3 process\(es\) x data.batch_size 32 cannot make it with "
                                          r"whole accumulation steps.* train.elastic=adapt to train on with global batch 96"):
        elastic.plan(at_epoch_end(2, 32, 1), layout(3, 32, 1))
    mid = elastic.Saved(Layout(2, 32, 1), 2, mid_epoch=True, boundary="runs/x/step-00000040")
    with pytest.raises(ConfigError, match=r"middle of epoch 3 .* with global batch 96 instead of 64 .* resume from "
                                          r"runs/x/step-00000040, saved at the end of an epoch"):
        elastic.plan(mid, layout(2, 48, 1))
    with pytest.raises(ConfigError, match=r"global batch 64 .* 3 process\(es\) x data.batch_size 32 cannot make it .*"
                                          r"change data.batch_size; or, for another global batch, resume from "
                                          r"runs/x/step-00000040"):  # no train.elastic=adapt for a mid-epoch position
        elastic.plan(mid, layout(3, 32, 1), elastic="adapt")
    assert elastic.plan(mid, layout(2, 32, 1)).changed is False  # the same layout: a mid-epoch position is fine
    kept = elastic.plan(mid, layout(1, 32, 1), elastic="adapt")  # the global batch kept: the epoch goes on exactly
    assert (kept.now.accum, kept.rescale) == (2, False)
    line, batches = kept.resumed(1257, 2, 6)  # 6 micro-batches of 2 x 32 done = 12 of 1 x 32
    assert batches == 12 and line.endswith("; epoch 3 goes on after its first 384 samples")
    # saved at the epoch's last step (a preemption): all of it done -- 14 padded batches of 3 x 32 are 40 of 1 x 32
    last = elastic.plan(elastic.Saved(Layout(3, 32, 1), 2, mid_epoch=True), layout(1, 32, 1))
    assert last.resumed(1257, 2, 14) == (last.message(1257, 2), 40)
    with pytest.raises(ConfigError, match=r"a DeepSpeed run resumes the middle of an epoch on the same layout only"):
        elastic.plan(mid, layout(2, 16, 2), deepspeed=True)
    with pytest.raises(ConfigError, match=r"a DeepSpeed checkpoint resumes on the number of processes that saved it \(2; "
                                          r"this run has 1\)"):
        elastic.plan(at_epoch_end(2, 32, 1), layout(1, 32, 1), deepspeed=True)
    assert elastic.plan(at_epoch_end(2, 32, 1), layout(2, 16, 2), deepspeed=True).now.accum == 2  # same processes
    with pytest.raises(ConfigError, match=r"train.max_steps=100 counts optimizer steps of either batch"):
        elastic.plan(at_epoch_end(2, 32, 1), layout(3, 32, 1), elastic="adapt", max_steps=100)
    assert elastic.plan(at_epoch_end(2, 32, 1), layout(1, 32, 1), max_steps=100).now.accum == 2  # kept batch: fine
    message = elastic.plan(at_epoch_end(2, 32, 1), layout(3, 32, 1), elastic="adapt").message(1257, 2)
    assert message.startswith("resume with another global batch (train.elastic=adapt): 64 -> 96, optimizer steps per "
                              "epoch 20 -> 14") and "resumes at the start of epoch 3 of it" in message


# ----------------------------------------------------------------------------------------------
# real runs


def args(digits_root, out, **overrides):
    return ["--config", config_path("digits.yaml"),
            *tiny_overrides(digits_root, out, **{**EXACT, "train.epochs": EPOCHS, **overrides})]


def killed_after_epoch_1(digits_root, out, processes, **overrides):
    proc = run_cli("train.py", args(digits_root, out, **overrides), processes, check=False,
                   env={FAULT_ENV: "kill@epoch:1"})
    assert_killed(proc)
    assert (out / "checkpoints" / "step-00000020").is_dir()


@pytest.fixture(scope="module")
def stayed_on_two(digits_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    run_cli("train.py", args(digits_root, out, **{"data.batch_size": 32}), processes=2)
    return out


@pytest.fixture(scope="module")
def stayed_on_one(digits_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    run_cli("train.py", args(digits_root, out, **{"data.batch_size": 32, "train.grad_accum_steps": 2}), processes=1)
    return out


def assert_continues(reference, run, steps_per_epoch=20):
    """The resumed run against one that stayed put: weights within the tolerance of accumulation vs DDP, the LR of
    every step equal, each evaluation's LR equal."""
    diff = max_weight_diff(reference, run)
    print(f"max weight diff after the change of processes: {diff:.3g}")
    assert diff <= WEIGHT_TOL
    assert scalars(run, "train/lr") == scalars(reference, "train/lr")
    assert [s for s, _ in scalars(run, "train/lr")] == list(range(1, EPOCHS * steps_per_epoch + 1))
    assert [m["lr"] for m in read_jsonl(run / "metrics.jsonl")] == [m["lr"] for m in read_jsonl(reference / "metrics.jsonl")]


def test_two_processes_resumed_on_one_keep_the_global_batch_and_the_schedule(stayed_on_two, digits_root, tmp_path):
    killed_after_epoch_1(digits_root, tmp_path, 2, **{"data.batch_size": 32})
    proc = run_cli("train.py", [*args(digits_root, tmp_path, **{"data.batch_size": 32}), "--resume", "auto"], processes=1)
    assert "elastic resume: the checkpoint was trained by 2 processes x batch 32 x accumulation 1 (global batch 64, 20 " \
           "optimizer steps per epoch); this run has 1 process x batch 32, so train.grad_accum_steps is 2" in proc.stdout
    assert "took over" in proc.stdout and "which is gone: pid" in proc.stdout  # the SIGKILLed run's lock
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert (info["num_processes"], info["grad_accum_steps"], info["global_batch"], info["optimizer_steps_per_epoch"]) == (1, 2, 64, 20)
    assert_continues(stayed_on_two, tmp_path)


def test_one_process_resumed_on_two_keeps_the_global_batch_and_the_schedule(stayed_on_one, digits_root, tmp_path):
    overrides = {"data.batch_size": 32, "train.grad_accum_steps": 2}
    killed_after_epoch_1(digits_root, tmp_path, 1, **overrides)
    proc = run_cli("train.py", [*args(digits_root, tmp_path, **overrides), "--resume", "auto"], processes=2)
    assert "this run has 2 processes x batch 32, so train.grad_accum_steps is 1" in proc.stdout
    assert "holds no RNG state for this rank" in proc.stdout  # rank 1 is new: it says so
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert (info["num_processes"], info["grad_accum_steps"], info["global_batch"]) == (2, 1, 64)
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["rank_batches"] == [20, 20]
    assert_continues(stayed_on_one, tmp_path)


def test_an_indivisible_change_is_refused_unless_adapted(stayed_on_two, digits_root, tmp_path):
    killed_after_epoch_1(digits_root, tmp_path, 2, **{"data.batch_size": 32})
    run = [*args(digits_root, tmp_path, **{"data.batch_size": 32}), "--resume", "auto"]
    refused = run_cli("train.py", run, processes=3, check=False)
    assert "cannot make it with whole accumulation steps" in refused.stderr and "train.elastic=adapt" in refused.stderr
    assert not (tmp_path / LOCK_FILE).exists()  # released after the error
    proc = run_cli("train.py", [*run, "train.elastic=adapt"], processes=3)
    assert "resume with another global batch (train.elastic=adapt): 64 -> 96, optimizer steps per epoch 20 -> 14" in proc.stdout
    ours, theirs = read_jsonl(tmp_path / "metrics.jsonl"), read_jsonl(stayed_on_two / "metrics.jsonl")
    assert [m["step"] for m in ours] == [20, 34, 48]  # epochs of 14 steps after the change
    # the rescaled schedule is at each epoch's end where the original was: the same epochs' fractions of the cosine
    assert [m["lr"] for m in ours] == pytest.approx([m["lr"] for m in theirs], rel=1e-9, abs=1e-12)
    assert ours[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # ends with the last epoch


def epoch_rows(log_prefix, epoch: int, last_step: int | None = None) -> list[int]:
    """The training rows the ranks' micro-batches took in `epoch` (faults.log_rows), up to optimizer step `last_step`."""
    rows = []
    for log in log_prefix.parent.glob(f"{log_prefix.name}.*"):
        for line in log.read_text().splitlines():
            e, step, *taken = map(int, line.split())
            if e == epoch and (last_step is None or step <= last_step):
                rows += taken
    return rows


def test_a_mid_epoch_checkpoint_resumes_on_another_number_of_processes_each_sample_once(digits_root, tmp_path):
    """2 processes killed in the middle of epoch 2; resumed on 1 (accumulation 2 keeps the global batch 64): the epoch
    goes on after the checkpoint's samples, every training row once in it. Another global batch is refused, naming the
    last epoch's end."""
    overrides = {"data.batch_size": 32, "checkpoint.every_n_steps": 7, "checkpoint.keep_last": 5}
    killed, resumed = tmp_path / "rows-killed", tmp_path / "rows-resumed"
    proc = run_cli("train.py", args(digits_root, tmp_path, **overrides), processes=2, check=False,  # saved at step 21:
                   env={FAULT_ENV: "kill@step:24", "DIST_TRAIN_ROWS_LOG": str(killed)})  # 1 step into epoch 2, an odd one
    assert_killed(proc)
    refused = run_cli("train.py", [*args(digits_root, tmp_path, **{**overrides, "data.batch_size": 48}), "--resume", "auto"],
                      processes=1, check=False)
    assert refused.returncode == 2
    assert ("1 process(es) x data.batch_size 48 cannot make it" in refused.stderr
            and f"resume from {tmp_path / 'checkpoints' / 'step-00000020'}, saved at the end of an epoch" in refused.stderr)
    proc = run_cli("train.py", [*args(digits_root, tmp_path, **overrides), "--resume", "auto"], processes=1,
                   env={"DIST_TRAIN_ROWS_LOG": str(resumed)})
    assert "train.grad_accum_steps is 2" in proc.stdout and "epoch 2 goes on after its first 64 samples" in proc.stdout
    before, after = epoch_rows(killed, 2, last_step=21), epoch_rows(resumed, 2)
    assert len(before) == 64 and len(set(before) & set(after)) == 0
    assert sorted(before + after) == list(range(len(before) + len(after)))  # every row once: none repeated, none left
    # the accumulation windows start at the checkpoint (not at Accelerate's saved micro-batch count, 21: odd)
    assert [m["step"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == [20, 40, 60]


def test_two_runs_on_one_directory_one_runs_the_other_is_refused(stayed_on_two, digits_root, tmp_path):
    out = tmp_path / "run"
    run = args(digits_root, out, **{"data.batch_size": 32})
    with ThreadPoolExecutor(2) as pool:  # two runs of forked ranks at once, each with its own store and port
        results = list(pool.map(lambda _: run_cli("train.py", run, processes=2, check=False), range(2)))
    codes = sorted(proc.returncode for proc in results)
    refused = next(proc.stderr for proc in results if proc.returncode != 0)
    assert codes[0] == 0 and codes[1] != 0, [(p.returncode, p.stderr[-2000:]) for p in results]
    assert f"error: {out} is in use by a run started" in refused and "choose another output_dir, or wait" in refused
    survivor = json.loads((out / "run_info.json").read_text())
    reference = json.loads((stayed_on_two / "run_info.json").read_text())
    assert survivor["final_weights_sha256_per_rank"] == reference["final_weights_sha256_per_rank"]
    assert not (out / LOCK_FILE).exists()  # released after success


def test_the_lock_is_released_after_an_error_and_after_preemption(digits_root, tmp_path):
    failed = run_cli("train.py", args(digits_root, tmp_path / "failed"), processes=2, check=False,
                     env={FAULT_ENV: "raise@step:3"})
    assert failed.returncode != 0 and "injected failure at step:3" in failed.stderr
    assert not (tmp_path / "failed" / LOCK_FILE).exists()
    out = tmp_path / "preempted"
    proc = subprocess.Popen(command("train.py", args(digits_root, out, **{"checkpoint.check_every_n_steps": 1}), processes=1),
                            env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists():  # training is under way (the lock is held)
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    assert (out / LOCK_FILE).exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == PREEMPTED_EXIT_CODE
    assert not (out / LOCK_FILE).exists()


def _write_many(path: str, tag: str, times: int) -> None:
    from pathlib import Path

    from dist_train.rundir.submission import write_submission

    ids = [f"id{i}" for i in range(20000)]
    for _ in range(times):
        write_submission(Path(path), ids, [tag] * len(ids))


def test_predictions_written_into_one_file_at_once_each_stay_whole(tmp_path):
    """predict.py needs no lock: two processes writing one submission at once each leave it whole (each writes a
    temporary of its own and renames it into place)."""
    import multiprocessing

    path = tmp_path / "submission.csv"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_many, args=(str(path), tag, 25)) for tag in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=300)
    assert [w.exitcode for w in writers] == [0, 0]
    lines = path.read_text().splitlines()
    assert lines[0] == "id,label" and len(lines) == 20001
    assert len({line.split(",")[1] for line in lines[1:]}) == 1  # one writer's file, not a mix
    assert not list(tmp_path.glob(".*.tmp"))
