"""launch/slurm_train.sbatch on a real SLURM cluster of two emulated nodes (slurmctld + 2 slurmd + munge).

Two machines x 1 CPU process join one gloo group; the result must be bitwise the one of a 1-machine
2-process run. A USR1 sent to the batch shell (`scancel --signal=USR1 --batch`) must end in a
checkpoint, a requeue, and a restarted job that resumes and finishes with the same weights. A machine lost (its
processes SIGKILLed) must end the job in bounded time, named; requeued, the job starts afresh when it was lost before
the first checkpoint, and resumes exactly when it was lost in the middle.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time

import psutil
import pytest
import slurm
from conftest import BIN, ROOT, config_path, read_jsonl, run_cli, run_env, tiny_overrides

from dist_train.rundir import checkpoint as ckpt

reason = slurm.available()
if reason and os.environ.get("CI") == "true":
    raise RuntimeError(f"CI must run the SLURM tests: {reason}")  # .ci/run installs SLURM
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")

RUN = {"train.epochs": 2, "data.num_workers": 2, "checkpoint.every_n_steps": 7, "checkpoint.check_every_n_steps": 1}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = slurm.Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def sbatch(cluster, out, digits_root) -> str:
    env = {**run_env(PATH=f"{BIN}:{os.environ['PATH']}"), "SLURM_CONF": str(cluster.conf), "JOIN_TIMEOUT_S": "120"}
    args = ["--config", config_path("digits.yaml"), *tiny_overrides(digits_root, out, **RUN)]
    proc = subprocess.run(["sbatch", "--parsable", "-N2", f"--output={out}.log", str(ROOT / "launch" / "slurm_train.sbatch"),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True)
    return proc.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def one_machine(digits_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    run_cli("train.py", ["--config", config_path("digits.yaml"), *tiny_overrides(digits_root, out, **RUN)], processes=2)
    return json.loads((out / "run_info.json").read_text())


@pytest.fixture(scope="module")
def two_machines(cluster, digits_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm_run") / "run"
    job = sbatch(cluster, out, digits_root)
    states: list[str] = []
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=240, seen=states)
    log = (out.parent / "run.log").read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    return out, info, states, log


def test_two_machines_join_one_group_and_train_as_one_machine_does(two_machines, one_machine):
    out, info, states, log = two_machines
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2" and "RUNNING" in states
    assert "node vm is machine 0 of 2" in log and "node vm is machine 1 of 2" in log
    run_info = json.loads((out / "run_info.json").read_text())
    assert run_info["num_processes"] == 2 and run_info["distributed_type"] == "DistributedType.MULTI_CPU"
    assert [(p["rank"], p["machine_rank"], p["local_rank"]) for p in run_info["processes"]] == [(0, 0, 0), (1, 1, 0)]
    for record in read_jsonl(out / "metrics.jsonl"):
        assert record["rank_batches"] == [20, 20] and record["val_samples"] == 270  # sharded across the machines
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1  # one writer
    assert len(list(out.parent.iterdir())) == 2  # one run directory (and the job's log)
    assert run_info["final_weights_sha256_per_rank"] == one_machine["final_weights_sha256_per_rank"]


def test_usr1_checkpoints_requeues_and_the_restarted_job_finishes_the_same(cluster, two_machines, digits_root, tmp_path):
    out = tmp_path / "run"
    job = sbatch(cluster, out, digits_root)
    deadline = time.time() + 180
    while not (out / "checkpoints" / ckpt.checkpoint_name(7)).exists():  # training is under way on both machines
        assert time.time() < deadline and cluster.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.05)
    cluster.run("scancel", "--signal=USR1", "--batch", job, check=True)
    states: list[str] = ["RUNNING"]
    info = cluster.wait(job, {"PENDING", "COMPLETED", "FAILED"}, timeout=120, seen=states)
    log = (tmp_path / "run.log").read_text()
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", log[-4000:]  # requeued by rank 0
    assert "forwarding to the training processes" in log and "preempted: a preemption signal reached the job" in log
    assert f"requeueing SLURM job {job}" in log
    saved = ckpt.complete_checkpoints(out / "checkpoints")[0]
    ckpt.verify(saved)
    assert 7 < int(saved.name.split("-")[1]) < 40

    release_now(cluster, job)
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=240, seen=states)
    log = (tmp_path / "run.log").read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert "SLURM_RESTART_COUNT=1: continuing with --resume auto" in log and f"resumed from {saved}" in log
    print("job states seen:", " -> ".join(states))
    ours = json.loads((out / "run_info.json").read_text())
    theirs = json.loads((two_machines[0] / "run_info.json").read_text())
    assert ours["global_step"] == 40 and ours["resumed_from"] == str(saved)
    assert ours["final_weights_sha256_per_rank"] == theirs["final_weights_sha256_per_rank"]


def test_a_machine_that_never_arrives_fails_with_a_clear_message(digits_root, tmp_path):
    """Machine 0 of 2 waits for a machine 1 that never starts: an error within JOIN_TIMEOUT_S, not a hang."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = run_env(PATH=f"{BIN}:{os.environ['PATH']}", SLURM_NODEID="0", NUM_MACHINES="2", MAIN_ADDR="127.0.0.1",
                  MAIN_PORT=str(port), JOIN_TIMEOUT_S="8")
    started = time.time()
    proc = subprocess.run(["bash", str(ROOT / "launch" / "slurm_node.sh"), "--config", config_path("digits.yaml"),
                           *tiny_overrides(digits_root, tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    # within JOIN_TIMEOUT_S and the launcher's start-up (24 s in all here, 34 s on a slow CI machine), not the 600 s
    # default: a run that ignored it would end at the timeout above
    assert proc.returncode != 0 and time.time() - started < 8 + 80
    assert ("error: dist_train: not every machine joined within JOIN_TIMEOUT_S=8 s (1/2 clients joined); "
            "this is machine 0 of 2") in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def release_now(cluster, job: str) -> None:
    """Skip the requeue delay of a job whose last run has ended. Not within the second its run was killed: slurmd
    revokes a killed job's credential at one-second resolution and refuses a restart signed in that same second
    ("Killing non-startable batch JobId=N: Job credential revoked", the job FAILED) -- SLURM's own delay avoids it."""
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=True)


def of_job(job: str):
    """Each process of job `job` (its environment says so), with its machine's number and its command line."""
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            env, cmdline = proc.environ(), " ".join(proc.info["cmdline"] or [])
        except (psutil.Error, OSError):
            continue
        if env.get("SLURM_JOB_ID") == job:
            yield proc, env.get("SLURM_NODEID"), cmdline


def node_processes(job: str, node_id: str) -> list[psutil.Process]:
    """The processes job `job` runs on its machine `node_id`: the launcher, the training processes and their loader
    workers, not SLURM's own."""
    return [proc for proc, node, cmdline in of_job(job) if node == node_id and (
            "accelerate" in cmdline or "train.py" in cmdline or "multiprocessing" in cmdline)]


def job_processes(job: str) -> list[str]:
    """What still runs for job `job` on either machine, for a failure's message."""
    return [f"machine {node}: {proc.pid} {proc.info['status']} {cmdline[:160]}" for proc, node, cmdline in of_job(job)]


def wait_for(cluster, job: str, path) -> None:
    """Until `path` exists, the job still under way."""
    deadline = time.time() + 180
    while not path.exists():
        assert time.time() < deadline and cluster.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.05)


LOST = re.compile(r"rank 0: stopping: lost contact with rank 1 \(machine 1 on host [^)]+\), which stopped without a "
                  r"word: killed, or its machine was lost")


def lose_machine_1(cluster, job: str, log_path, since: int) -> str:
    """SIGKILL machine 1's launcher, training process and loader workers (as when a node dies: all of them, so also
    one started while they were being listed); rank 0 must name the lost rank within seconds, and the job end (after
    SLURM's own steps: its KillWait is 30 s) well before the hang timeout (600 s). Returns what the job logged from byte
    `since` on."""
    victims = node_processes(job, "1")
    assert any("train.py" in " ".join(p.cmdline()) for p in victims), victims
    killed = time.time()
    for _ in range(20):
        for proc in victims:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        victims = node_processes(job, "1")
        if not victims:
            break
    said = lambda: log_path.read_bytes()[since:].decode(errors="replace")  # noqa: E731  (what the job logged so far)
    named = left = None
    while (state := cluster.job(job).get("JobState")) not in {"FAILED", "CANCELLED", "COMPLETED", "NODE_FAIL", "PENDING"}:
        if named is None and LOST.search(said()):
            named = time.time() - killed
        if left is None and named is not None and time.time() - killed > named + 20:
            left = job_processes(job)  # what keeps the job up after rank 0 stopped
        assert time.time() - killed < 120, f"job {job} still {state} 120 s after machine 1 was lost\n" + "\n".join(
            job_processes(job)) + "\n" + said()[-4000:]
        time.sleep(0.2)
    ended = time.time() - killed
    log = said()
    print(f"machine 1 killed: rank 0 named it {named or ended:.1f} s later, the job ended {ended:.1f} s later ({state})"
          + (f"; 20 s after rank 0 stopped, still running: {left}" if left else ""))
    assert state != "COMPLETED", log[-4000:]
    assert LOST.search(log), log[-4000:]
    # (ended: once in CI, 60 s -- machine 1's task reported its end only after machine 0's; `left` says what runs then)
    assert (named or ended) < 30 and ended < 110, f"{named=} {ended=} still running then: {left}\n{log[-4000:]}"
    return log


def requeue(cluster, job: str) -> None:
    """As SLURM requeues a --requeue job after a node failure."""
    cluster.run("scontrol", "requeue", job, check=True)
    cluster.wait(job, {"PENDING", "CONFIGURING", "RUNNING"}, timeout=60)  # (the requeue takes a moment to show)
    release_now(cluster, job)


def test_a_lost_machine_ends_the_job_naming_it_and_the_requeued_job_resumes_exactly(cluster, two_machines, digits_root, tmp_path):
    """Machine 1 lost before the run's first checkpoint, then again in the middle: each time machine 0 stops within
    the bound, naming the lost rank; requeued, the job starts from the beginning (no checkpoint yet), then resumes
    from the last checkpoint, and ends with the weights of the undisturbed run."""
    out, log_path = tmp_path / "run", tmp_path / "run.log"
    job = sbatch(cluster, out, digits_root)
    started = time.time()
    wait_for(cluster, job, out / "run_info.json")  # written as training starts; the first save is at step 7
    lose_machine_1(cluster, job, log_path, since=0)
    assert not ckpt.complete_checkpoints(out / "checkpoints"), "machine 1 was lost after the first checkpoint"

    said = log_path.stat().st_size
    requeue(cluster, job)
    wait_for(cluster, job, out / "checkpoints" / ckpt.checkpoint_name(14))
    log = lose_machine_1(cluster, job, log_path, since=said)
    assert "SLURM_RESTART_COUNT=1: continuing with --resume auto" in log
    assert f"no checkpoint in {out / 'checkpoints'} yet: starting the run from the beginning" in log
    saved = ckpt.complete_checkpoints(out / "checkpoints")[0]
    ckpt.verify(saved)

    said = log_path.stat().st_size
    requeue(cluster, job)
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=240)
    log = log_path.read_bytes()[said:].decode(errors="replace")
    assert info["JobState"] == "COMPLETED", f"{log[-4000:]}\n{info}\n{cluster.logs()}"
    assert "SLURM_RESTART_COUNT=2: continuing with --resume auto" in log and f"resumed from {saved}" in log
    print(f"killed twice, requeued twice: {time.time() - started:.1f} s from submission to the end")
    ours = json.loads((out / "run_info.json").read_text())
    theirs = json.loads((two_machines[0] / "run_info.json").read_text())
    assert ours["final_weights_sha256_per_rank"] == theirs["final_weights_sha256_per_rank"]
