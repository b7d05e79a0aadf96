"""The guard against processes a test leaves running: a rank, a loader worker, a launcher, a Slurm daemon or job.

Every pytest process (the controller, each xdist worker) marks its environment with its own pid; whatever a test
starts inherits the mark, also what daemonizes or is re-parented (slurmd, a job's srun, an orphaned worker), so a
scan of the machine's processes finds them wherever they are. After each test (and after each module, for what
its module-scoped fixtures started) every marked process that was not running before it, and is not one of this
pytest process's own helpers, is a stray: the test errors naming it, and the stray is killed so that it cannot
disturb the tests after it.
"""
from __future__ import annotations

import os
import time

import psutil

MARK = "DIST_TRAIN_TEST_OWNER"
GRACE_S = float(os.environ.get("DIST_TRAIN_STRAY_GRACE_S", "10"))
"""How long a process that is on its way out (a rank flushing after its result, a worker its parent just ended)
may take before it counts as left running."""


def mark() -> None:
    os.environ[MARK] = str(os.getpid())


def _helpers() -> set[int]:
    """This process's own long-lived helpers: multiprocessing's fork server (tests/ranks.py forks ranks from it; the
    in-process loaders' workers too) and resource tracker, started by the first test that needs them."""
    from multiprocessing import forkserver, resource_tracker

    pids = {getattr(forkserver._forkserver, "_forkserver_pid", None), getattr(resource_tracker._resource_tracker, "_pid", None)}
    return {pid for pid in pids if pid}


def running() -> dict[int, str]:
    """pid -> command line of every live (not zombie) process carrying this pytest process's mark, but itself."""
    owner, found = os.environ.get(MARK), {}
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.info["pid"] == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if proc.environ().get(MARK) == owner:
                found[proc.pid] = " ".join(proc.cmdline())[:300]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def left_running(before: dict[int, str]) -> dict[int, str]:
    """What runs now that did not before (nor is a helper), once GRACE_S has let the exiting ones go; those are killed."""
    deadline = time.monotonic() + GRACE_S
    while True:
        new = {pid: cmd for pid, cmd in running().items() if pid not in before and pid not in _helpers()}
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in new:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass
    return new


def describe(strays: dict[int, str], what: str) -> str:
    lines = "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in sorted(strays.items()))
    return f"{what} left {len(strays)} process(es) running after it ended (killed now):\n{lines}"
