"""Ranks of train.py / predict.py started without a launcher, for the tests where the launcher is not what is tested.

`accelerate launch` costs a test about 8 s of start-up per run on the 2-core machine (the launcher imports torch
and Accelerate, then every rank imports torch, torchvision, scikit-learn and dist_train, two at a time on two cores),
and a one-process `python train.py` about 5 s. Here every rank is forked from a fork server that imported the
training path once per test session: the same script runs as `__main__` with the environment torchrun gives a rank
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, the agent's store hosted here, as torchrun's agent hosts it, and
Accelerate's launch variables), in a real process with a real gloo group, its stdout and stderr captured. What a
launcher does itself (forwarding signals, restarting, stopping the others when a rank fails, its exit codes) is
tested with the real one: tests/conftest.run_cli uses this unless asked with `forked=False` -- for runs that succeed,
and for runs a fault ends where what is tested is what the run leaves or says (the checkpoints after a SIGKILL, an
error's words); each such fault kind keeps a test under the real launcher. Loader workers start as in a launched rank: the script runs
as `__main__` (runpy, its `__file__` and its `if __name__ == "__main__":` guard), so each rank starts its own workers'
fork server, which preloads the script; and each rank starts its own resource tracker, which outlives a SIGKILLed rank
to unlink the semaphores it left, saying so in the rank's stderr, as a launched rank's does.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ["torch", "torchvision", "sklearn.metrics", "accelerate", "dist_train.commands.cli", "dist_train.loop.trainer",
           "dist_train.commands.inference"]
"""What the server imports once (it never runs a torch op: its children fork from a process with no threads)."""
ACCELERATE_ENV = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_DYNAMO_MODE": "default",
                  "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False", "ACCELERATE_DYNAMO_USE_DYNAMIC": "False",
                  "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "False"}
"""What `accelerate launch --config_file accelerate_config.yaml` sets for its ranks (read off a launch with 1.15)."""
_context = None


def context() -> multiprocessing.context.BaseContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(script: str, args: list[str], env: dict[str, str], out: str, err: str) -> None:
    """One rank: the script as `__main__`, as `python script args` would run it."""
    for fd, path in ((1, out), (2, err)):
        file = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(file, fd)
        os.close(file)
    sys.stdout.reconfigure(line_buffering=True, write_through=True)
    sys.stderr.reconfigure(line_buffering=True, write_through=True)
    os.environ.clear()
    os.environ.update(env)
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker  # the server's (this test session's); a launched rank starts its own
    if tracker._fd is not None:
        os.close(tracker._fd)
    tracker._fd = tracker._pid = None
    multiprocessing.set_start_method("fork", force=True)  # as in a launched rank (the server's children default to its own)
    os.chdir(ROOT)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    sys.argv = [script, *args]
    atexit._clear()  # the test session's own, inherited with the fork
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        # What an interpreter's exit does first (a forked process ends without it): e.g. torch stops the loader
        # workers, before multiprocessing's own exit joins the rank's children -- their fork server among them
        atexit._run_exitfuncs()


def run_ranks(script: str, args: list[str], processes: int, env: dict[str, str], timeout: float
              ) -> subprocess.CompletedProcess:
    """Run `script args` as `processes` ranks (one: a plain process); returns what a launch would: the exit code (the
    first rank's that failed, else 0) and stdout/stderr of all ranks together; each rank's own code in `rank_codes` (what
    a launcher's failure report lists)."""
    from torch.distributed import TCPStore

    ctx = context()
    store = None
    if processes > 1:
        port = _free_port()
        store = TCPStore("127.0.0.1", port, processes, is_master=True, timeout=timedelta(seconds=timeout),
                         wait_for_workers=False)  # torchrun's agent store: the ranks' rendezvous and dist_train's watchdog
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        out.touch()
        err.touch()
        ranks = []
        for rank in range(processes):
            rank_env = dict(env)
            if processes > 1:
                rank_env.update(ACCELERATE_ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
                                LOCAL_WORLD_SIZE=str(processes), GROUP_RANK="0", GROUP_WORLD_SIZE="1", ROLE_RANK=str(rank),
                                ROLE_WORLD_SIZE=str(processes), ROLE_NAME="default", MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=str(port), TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0",
                                TORCHELASTIC_RUN_ID="none", TORCHELASTIC_USE_AGENT_STORE="True",
                                OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
            process = ctx.Process(target=_rank_main, args=(str(ROOT / script), args, rank_env, str(out), str(err)))
            process.start()
            ranks.append(process)
        code = _wait(ranks, timeout)
        del store
        said = out.read_text(errors="replace"), err.read_text(errors="replace")
    if code is None:
        raise AssertionError(f"{script} {' '.join(args)} ({processes} forked ranks) did not end within {timeout} s\n"
                             f"--- stdout\n{said[0][-4000:]}\n--- stderr\n{said[1][-8000:]}")
    proc = subprocess.CompletedProcess([script, *args], code, *said)
    proc.rank_codes = [p.exitcode for p in ranks]
    return proc


def _wait(ranks: list, timeout: float) -> int | None:
    """Every rank's end; a rank that failed stops the others after 30 s, as a launcher would. None: timed out."""
    deadline, failed_at, first_failure = time.monotonic() + timeout, None, 0
    while any(p.exitcode is None for p in ranks):
        for p in ranks:
            if p.exitcode not in (None, 0) and not first_failure:
                first_failure, failed_at = p.exitcode, time.monotonic()
        if time.monotonic() > deadline or (failed_at is not None and time.monotonic() > failed_at + 30):
            for p in ranks:
                if p.exitcode is None:
                    os.kill(p.pid, signal.SIGKILL)
            for p in ranks:
                p.join()
            return first_failure or None
        time.sleep(0.05)
    codes = [p.exitcode for p in ranks]
    return first_failure or next((c for c in codes if c), 0)
