"""How loader workers start (data.worker_start): what another thread of the rank holds at the start does not reach
them, and nothing they leave behind outlives a killed rank."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import psutil
import pytest
import torch
from conftest import ROOT, run_env

SCRIPT = str(ROOT / "tests" / "worker_script.py")


def test_a_lock_held_by_another_thread_at_the_start_reaches_forked_workers_only():
    """The hazard behind data.worker_start, made certain: under fork the workers inherit the lock held and wait
    forever (as a worker did in CI on a glibc lock); the fork server's workers start from a process without it."""
    # the three at once: two of them wait out the loader's 10 s timeout
    procs = {start: subprocess.Popen([sys.executable, SCRIPT, start, "lock"], env=run_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for start in ("forkserver", "auto", "fork")}
    runs = {start: proc.communicate(timeout=120) for start, proc in procs.items()}
    # auto: fork, for a dataset of the script's own (one of dist_train's gets the fork server: the test below)
    assert {start: out.strip() for start, (out, _) in runs.items()} == {"forkserver": "read", "auto": "hung", "fork": "hung"}, \
        {start: err[-2000:] for start, (_, err) in runs.items()}


@pytest.mark.parametrize("start", ["forkserver", "fork"])
def test_workers_and_the_fork_server_end_with_a_killed_rank(start):
    proc = subprocess.Popen([sys.executable, SCRIPT, start, "sleep"], env=run_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        left = psutil.Process(proc.pid).children(recursive=True)
        assert len(left) >= 2  # the two workers (and under forkserver the server and its resource tracker)
        if start == "forkserver":  # the server: a fork of the one-threaded rank, not a fresh interpreter importing torch
            rank = psutil.Process(proc.pid).cmdline()
            lines = [p.cmdline() for p in left]
            assert lines.count(rank) == 3 and not any("multiprocessing.forkserver" in " ".join(c) for c in lines), lines
        proc.send_signal(signal.SIGKILL)  # no exit handler runs: the workers must go by themselves
        proc.wait(timeout=10)
        gone, alive = psutil.wait_procs(left, timeout=15)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        proc.kill()


def test_a_rank_with_another_thread_starts_the_fork_server_as_cpython_does():
    """Forking the server is safe only while the rank has one thread; with another (gloo's, a watchdog's) the server
    is CPython's fresh interpreter, as before."""
    import threading
    from multiprocessing import util

    from dist_train.data import workers

    spawn, stop = util.spawnv_passfds, threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert not workers._alone()
        with workers._server_forked_from_here():
            assert util.spawnv_passfds is spawn
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("start", ["forkserver", "fork"])
def test_slurms_warning_signals_to_the_rank_process_group_spare_its_workers_and_server(start):
    """SLURM's SIGTERM (and a launcher's: torchrun signals each rank's process group) or SIGUSR1 reach every
    process of the rank's group: the rank acts on them at its next step and so needs its loader until then --
    neither its workers nor (forkserver) their server may die of them. (CPython's resource tracker start
    unblocks SIGTERM: a fork server started after it died, and took its workers with it.)"""
    proc = subprocess.Popen([sys.executable, SCRIPT, start, "signal"], env=run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        group = psutil.Process(proc.pid).children(recursive=True)
        assert len(group) >= (4 if start == "forkserver" else 2)  # two workers (the server and its tracker)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            os.killpg(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=60)
        assert (stdout.strip(), proc.returncode) == ("read 3 more", 0), stderr[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_auto_starts_dist_train_datasets_from_the_fork_server_and_others_by_fork():
    from torch.utils.data import TensorDataset

    from dist_train.data.datasets import ImageDataset
    from dist_train.data.tables import Records
    from dist_train.data.workers import resolve_worker_start, worker_context

    ours = ImageDataset(Records([], [], []), None, 1)
    # under pytest (`python -m pytest`: a guarded __main__) the fork server may import the script run
    assert worker_context("auto", ours).get_start_method() == "forkserver"
    assert worker_context("auto", TensorDataset()).get_start_method() == "fork"
    # what the CLI's early server start asks: the same rule, a data.file dataset being a user's own
    assert [resolve_worker_start(start, mine) for start in ("auto", "fork", "forkserver") for mine in (True, False)] == \
        ["forkserver", "fork", "fork", "fork", "forkserver", "forkserver"]


def test_a_script_without_a_main_guard_starts_workers_by_fork_and_says_why(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text("from dist_train.data import worker_context\n"
                      "print(worker_context('auto').get_start_method())\nprint(worker_context('auto').get_start_method())\n")
    run = subprocess.run([sys.executable, str(script)], env=run_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["fork", "fork"]
    assert run.stderr.count("warning:") == 1 and "if __name__ == \"__main__\":" in run.stderr and "data.worker_start=fork" in run.stderr
    guarded = tmp_path / "guarded.py"
    guarded.write_text("from dist_train.data import worker_context\n\nif __name__ == '__main__':\n"
                       "    print(worker_context('auto').get_start_method())\n")
    run = subprocess.run([sys.executable, str(guarded)], env=run_env(), capture_output=True, text=True, timeout=120)
    assert (run.stdout.strip(), run.stderr.count("warning:")) == ("forkserver", 0), run.stderr


def test_records_travel_to_workers_by_reference_and_read_back_as_paths(tmp_path):
    """What a fork-server worker gets: the table's columns as the cache file's path and a shared row index, whatever
    the number of rows (ImageNet's 1.28 M Path objects took 8.4 s to unpickle, as one string 66 MB a worker); in-memory
    columns (folders) as Arrow arrays; each path read back as the Path it was."""
    import pickle
    from multiprocessing.reduction import ForkingPickler
    from pathlib import Path

    from dist_train.config import DataConfig
    from dist_train.data.columns import PathColumn
    from dist_train.data.tables import Records, read_split

    paths = [tmp_path / f"class {i % 3}" / f"ünï {i}.jpg" for i in range(10)]
    records = Records(list(paths), list(range(10)), [f"id{i}" for i in range(10)])
    back = pickle.loads(pickle.dumps(records))
    assert isinstance(back.paths, PathColumn) and len(back.paths) == 10
    assert [back.paths[i] for i in range(10)] == paths and all(isinstance(p, Path) for p in back.paths)
    assert back.paths[2:4] == paths[2:4] and list(back.take([7, 1]).paths) == [paths[7], paths[1]]
    assert back.targets.tolist() == list(range(10)) and list(back.ids) == list(records.ids)
    assert pickle.loads(pickle.dumps(back)).paths[9] == paths[9]  # and again, from a worker's own copy

    (tmp_path / "a.png").write_bytes(b"")
    sizes = {}
    for rows in (10, 100_000):
        table = tmp_path / f"t{rows}.csv"
        table.write_text("id,image,label\n" + "".join(f"r{i},a.png,{i % 3}\n" for i in range(rows)))
        split = read_split(DataConfig(source="csv", root=str(tmp_path), train=table.name, cache_dir=str(tmp_path / "cache")),
                           "train", labelled=True)
        split.targets = torch.arange(rows)
        held = split.take(np.arange(rows - 1, -1, -2))
        sizes[rows] = len(ForkingPickler.dumps(held))
        worker = pickle.loads(ForkingPickler.dumps(held))  # as the fork server's worker unpickles it
        assert (len(worker.paths), worker.ids[0], worker.paths[1], int(worker.targets[2])) == (
            rows // 2, f"r{rows - 1}", tmp_path / "a.png", rows - 5)
    assert max(sizes.values()) < 4096 and abs(sizes[100_000] - sizes[10]) < 64, sizes  # names of the shared memory