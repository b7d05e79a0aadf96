"""Faults a long job meets: preemption signals, hung or failing ranks, dying launchers; and test-only fault injection."""
from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from functools import cache
from typing import Callable

import torch

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" -- the job saved its state and wants to be restarted
FAILED_EXIT_CODE = 1
HUNG_EXIT_CODE = 124  # as timeout(1): this rank made no progress within train.distributed_timeout_s
_stopping = threading.Event()  # this rank already reported why the job stops; later errors are echoes


class Preempted(Exception):
    """A preemption signal reached some rank; a complete checkpoint was saved before this was raised."""


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


# ----------------------------------------------------------------------------------------------
# preemption


class SignalFlag:
    """Remembers that SIGTERM or SIGUSR1 (SLURM's warning signals) reached this process; acting on it is
    left to the next step boundary, where all ranks agree (see `distributed.any_rank`)."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.received: str | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def restore(self) -> None:
        """The handlers from before: once the run has failed, a SIGTERM ends the process again."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name


def requeue_slurm_job() -> str | None:
    """`scontrol requeue $SLURM_JOB_ID` when running under SLURM; returns the job id requeued."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    print(f"requeueing SLURM job {job}; the restarted job resumes from the checkpoint", file=sys.stderr, flush=True)
    time.sleep(2)  # requeueing cancels this job at once: let the log lines reach the job's output first
    subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)
    return job


def die_with_launcher() -> None:
    """Ask Linux to send SIGTERM to this worker when the launcher that started it dies.

    torchrun starts each worker in a session of its own, so a launcher killed with SIGKILL (an OOM
    kill, `kill -9`) would leave the workers training on as orphans; with this they save a checkpoint
    at the next step boundary and exit, as on preemption.
    """
    if "LOCAL_RANK" in os.environ:
        die_with_parent(signal.SIGTERM)


def _find_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):
        return None


# Looked up once, at import: a data-loader worker forked from a multi-threaded rank must not dlopen.
_prctl = _find_prctl()


def die_with_parent(sig: signal.Signals, parent: int | None = None) -> None:
    """Have Linux send `sig` to this process when its parent dies (prctl PR_SET_PDEATHSIG); elsewhere a no-op.
    `parent`: the pid the parent should have (by default the current one); when it is not that, `sig` now."""
    if _prctl is None:
        return
    parent = os.getppid() if parent is None else parent
    _prctl(1, int(sig))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


# ----------------------------------------------------------------------------------------------
# hangs and failures


class Watchdog:
    """Ends the job when this rank makes no progress for `timeout_s` seconds, naming the rank that hung.

    The loop calls `beat()` at each batch (after loading it, after the forward, after the step). Every
    few seconds each rank publishes its beat count in the launcher's key-value store. When a rank has
    been idle for `timeout_s`, it compares counts: a rank behind the others is the hung one -- it dumps
    where each of its threads is and exits with HUNG_EXIT_CODE; a rank that is merely waiting for it
    (in a collective) says which rank it waits for and exits too. (The process-group timeout, set
    longer, is only the backstop.) A single process has no peer to hang: there it watches nothing, so
    that a debugger may pause it.
    """

    def __init__(self, timeout_s: float, world: int):
        self.timeout_s = timeout_s
        self.world = world
        self.count = 0
        self.last = time.monotonic()
        self._stop = threading.Event()
        self.before_exit: list[Callable[[], None]] = []  # run by the watchdog before it ends a hung job (e.g. unlock)
        if world > 1:
            threading.Thread(target=self._watch, name="dist_train-watchdog", daemon=True).start()

    def beat(self) -> None:
        self.count += 1
        self.last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        store = _launcher_store()
        key = f"dist_train/beat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        _tell(store, _store_key("where", rank()), f"machine {os.environ.get('GROUP_RANK', '0')} on host {socket.gethostname()}")
        poll = min(5.0, self.timeout_s / 4)
        while not self._stop.wait(poll):
            counts = {rank(): self.count}
            if store is not None:
                try:
                    store.set(key + str(rank()), str(self.count))
                    counts = {r: int(store.get(key + str(r))) for r in range(self.world) if store.check([key + str(r)])}
                except Exception:  # the store went away with the launcher: judge alone
                    store = None
            idle = time.monotonic() - self.last
            if idle <= self.timeout_s or self._stop.is_set():
                continue
            behind = sorted(r for r, c in counts.items() if c == min(counts.values()))
            _stopping.set()
            self._run_before_exit()  # the main thread is stuck: its `finally` will not run
            sys.stdout.flush()
            _tell(store, _store_key("stopping", rank()))  # this rank says why it stops: it is not a lost one
            if rank() not in behind:
                sys.stderr.write(f"rank {rank()}: stopping: waited {idle:.0f} s for rank(s) "
                                 f"{', '.join(map(str, behind))}, which made no progress (reported by them)\n")
                sys.stderr.flush()
                _tell(store, key + "reported/" + str(rank()))
                time.sleep(5)  # let the hung rank report first
                os._exit(HUNG_EXIT_CODE)
            sys.stderr.write(f"error: rank {rank()} made no progress for {idle:.0f} s "
                             f"(train.distributed_timeout_s={self.timeout_s:g}): it is hung; stopping the job. "
                             f"Where each thread of rank {rank()} was:\n")
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            # The ranks waiting for this one notice at their next poll; the launcher stops them all as soon
            # as this rank exits, so give them that long to say which rank they wait for.
            waiting = [key + "reported/" + str(r) for r in range(self.world) if r not in behind]
            _await(store, waiting, deadline=time.monotonic() + 2 * poll + 2)
            os._exit(HUNG_EXIT_CODE)

    def _run_before_exit(self) -> None:
        for action in self.before_exit:
            try:
                action()
            except Exception as exc:  # the report of the hang comes first
                sys.stderr.write(f"rank {rank()}: while stopping: {type(exc).__name__}: {exc}\n")


def _tell(store, key: str, value: str = "1") -> None:
    if store is not None:
        try:
            store.set(key, value)
        except Exception:
            pass


def _store_key(what: str, of_rank: int) -> str:
    """A key of this launch (torchrun's restarts start afresh) about one rank."""
    return f"dist_train/{what}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{of_rank}"


def say_stopping():
    """Tell the other ranks (through the launcher's store) that this rank reports why it stops, so that none of them
    takes it for lost; returns the store (None without a launcher)."""
    store = _launcher_store(timeout_s=5) if "MASTER_ADDR" in os.environ else None
    _tell(store, _store_key("stopping", rank()))
    return store


def _silent_peers(store, world: int, wait_s: float = 2.0) -> list[str]:
    """The other ranks that stopped without a word: no failure report of theirs in the store after `wait_s` (their
    peers, failing together with this one, report within it). Each as "rank R (machine M on host H)". What each
    rank's place is gets read first: the store's host (the head machine's launcher) may go down meanwhile."""
    peers = [r for r in range(world) if r != rank()]
    where = {}
    for r in peers:
        try:  # check first: get() would wait for a key that never comes
            if store.check([_store_key("where", r)]):
                where[r] = store.get(_store_key("where", r)).decode()
        except Exception:
            return []
    deadline, silent = time.monotonic() + wait_s, peers
    while silent and time.monotonic() < deadline:
        try:
            silent = [r for r in silent if not store.check([_store_key("stopping", r)])]
        except Exception:  # the store went down with its launcher: judge by what was seen
            break
        time.sleep(0.1)
    return [f"rank {r} ({where[r]})" if r in where else f"rank {r}" for r in silent]


def _await(store, keys: list[str], deadline: float) -> None:
    """Wait until every key is in the store or the deadline passes (never raises)."""
    while store is not None and keys and time.monotonic() < deadline:
        try:
            if store.check(keys):
                return
        except Exception:
            return
        time.sleep(0.2)


def _launcher_store(timeout_s: float = 30):
    """A client of the key-value store the launcher (torchrun's agent) hosts, or None."""
    try:
        from datetime import timedelta

        return torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                          timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except Exception:
        return None


def is_peer_failure(exc: BaseException) -> bool:
    """An error that only says another rank went away (its own error is reported by that rank)."""
    if isinstance(exc, getattr(torch.distributed, "DistBackendError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting",
        "timed out", "NCCL communicator was aborted", "ProcessGroupGloo", "gloo/transport"))


def report_failure(exc: BaseException) -> None:
    """Under a launcher: print this rank's unexpected failure once (peers that merely lost it say so in one
    line), then exit now -- a normal interpreter exit would wait on data-loader workers and a broken
    process group. A single process returns, and the caller re-raises for Python's usual traceback.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # the launcher stopping the job must not cut the report short
        signal.signal(sig, signal.SIG_IGN)
    sys.stdout.flush()
    if _stopping.is_set():  # the watchdog is reporting a hang; this error is its consequence
        time.sleep(60)
        os._exit(HUNG_EXIT_CODE)
    store = say_stopping()
    if is_peer_failure(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        silent = _silent_peers(store, world) if store is not None else []
        if silent:
            print(f"rank {rank()}: stopping: lost contact with {', '.join(silent)}, which stopped without a word: killed, "
                  f"or its machine was lost ({first[:120]}). The last checkpoint is intact: resume with --resume auto",
                  file=sys.stderr, flush=True)
        else:
            print(f"rank {rank()}: stopping: lost contact with another rank, whose error is reported by itself "
                  f"({first[:120]})", file=sys.stderr, flush=True)
    else:
        frames = "".join(traceback.format_tb(exc.__traceback__))
        where = f"rank {rank()} of {world}" if world > 1 else "the run"
        print(f"Traceback (most recent call last):\n{frames}error: {where} failed: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
    os._exit(FAILED_EXIT_CODE)


# ----------------------------------------------------------------------------------------------
# fault injection for the tests: DIST_TRAIN_FAULT="action@point[#rank],..." (rank 0 by default)
#   actions: kill (SIGKILL), raise, hang, nan (the loss and gradient of that optimizer step),
#            nanloss (NaN added to that step's loss: its gradient stays finite), oom,
#            fsize=BYTES (a file-size limit from then on: later writes fail with EFBIG), signal=NAME
#   points:  step:N (after optimizer step N; for nan: its micro-batches), batch:N (after the N-th
#            micro-batch of the run), evaluated:N (an evaluation at step N recorded, before the epoch's save),
#            epoch:N (after epoch N's save), save-PHASE:N (inside the save of
#            step N; PHASE in written, fsynced, sealed, linked, rotating), find:B (batch-size trial B)

FAULT_ENV = "DIST_TRAIN_FAULT"
FAULT_LOG_ENV = "DIST_TRAIN_FAULT_LOG"  # a file: each fault, as it fires, appends "UNIX_TIME action@point#rank"


@cache
def _planned() -> tuple[tuple[str, str, int], ...]:
    faults = []
    for item in filter(None, (s.strip() for s in os.environ.get(FAULT_ENV, "").split(","))):
        action, _, where = item.partition("@")
        point, _, on_rank = where.partition("#")
        faults.append((action, point, int(on_rank or 0)))
    return tuple(faults)


def planned(action: str, point: str) -> bool:
    """Whether the test asked for `action` at `point` on this rank."""
    return any(a == action and p == point and r == rank() for a, p, r in _planned())


ROWS_LOG_ENV = "DIST_TRAIN_ROWS_LOG"


def log_rows(epoch: int, step: int, rows) -> None:
    """Test-only: the training rows a micro-batch of this rank took, as "epoch step row row ...", appended to
    $DIST_TRAIN_ROWS_LOG.<rank> (a no-op unless it is set): what a test of resumes counts samples by."""
    if path := os.environ.get(ROWS_LOG_ENV):
        with open(f"{path}.{rank()}", "a") as log:
            log.write(f"{epoch} {step} {' '.join(map(str, rows.tolist()))}\n")


def inject(point: str) -> None:
    """Carry out the faults planned at `point` for this rank (a no-op unless DIST_TRAIN_FAULT is set)."""
    if not _planned():
        return
    for action, at, on_rank in _planned():
        if at != point or on_rank != rank():
            continue
        name, _, arg = action.partition("=")
        if log_path := os.environ.get(FAULT_LOG_ENV):  # when it fired: a test times what follows, not start-up
            with open(log_path, "a") as log:
                log.write(f"{time.time():.3f} {action}@{point}#{on_rank}\n")
        if name == "kill":
            os.kill(os.getpid(), signal.SIGKILL)  # a crash, not an exit: nothing gets to clean up
        elif name == "raise":
            raise RuntimeError(f"injected failure at {point}")
        elif name == "hang":
            while True:
                time.sleep(3600)
        elif name == "oom":
            raise torch.OutOfMemoryError(f"injected: CUDA out of memory at {point}")
        elif name == "fsize":
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (int(arg), int(arg)))
        elif name == "signal":
            os.kill(os.getpid(), getattr(signal, f"SIG{arg}"))


def exit_process(code: int) -> None:
    """End a launched worker without interpreter finalization: finalizing with gloo's threads still around
    can abort the process after a successful run ("terminate called without an active exception",
    pytorch/pytorch#190489). Output is flushed first; the process group is already destroyed."""
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os._exit(code)
    sys.exit(code)
