"""Loader workers started from a fork server (not forked from a threaded rank), bound to their rank's life."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import re
import signal
import sys
from pathlib import Path

from dist_train.config import DataConfig
from dist_train.data.datasets import ImageDataset
from dist_train.job.faults import die_with_parent


def loader_worker_init(worker_id: int) -> None:
    """Loader workers share their rank's process group, so SLURM's SIGTERM/SIGUSR1 reach them too: they
    must live on until the rank, which acts on the signal at the next step boundary, is done with them.
    And they die with their rank at once (not at torch's next 5 s liveness check), so that a crashed rank
    leaves no orphans holding the job's output open. (worker_context's processes do this before torch's
    own start-up too.)"""
    bind_to_parent(os.getppid())


def bind_to_parent(parent: int) -> None:
    """loader_worker_init's binding, for a worker whose parent should be `parent`: one already gone ends it now."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL, parent)


class _ForkedWorker(multiprocessing.context.ForkProcess):
    def run(self) -> None:
        bind_to_parent(self._parent_pid)  # before torch's start-up, which may hang (worker_context)
        super().run()


class _ForkServerWorker(multiprocessing.context.ForkServerProcess):
    def run(self) -> None:
        # The server gives each child its "a client is alive" pipe, so that it outlives them; a worker does not
        # start processes of its own, so it lets go: the server then ends with its rank, and takes the workers.
        # Bound first, while the pipe still keeps the server (this worker's parent) alive.
        from multiprocessing import forkserver

        bind_to_parent(os.getppid())
        if forkserver._forkserver._forkserver_alive_fd is not None:
            os.close(forkserver._forkserver._forkserver_alive_fd)
            forkserver._forkserver._forkserver_alive_fd = None
        super().run()


class _ForkContext(multiprocessing.context.ForkContext):
    Process = _ForkedWorker


class _ForkServerContext(multiprocessing.context.ForkServerContext):
    Process = _ForkServerWorker


def worker_context(start: str, dataset=None) -> multiprocessing.context.BaseContext:
    """How loader workers start (data.worker_start), each bound to its rank from its first instruction.

    A worker forked from the rank itself (fork) copies a process with other threads (gloo's, the watchdog);
    the first time a process runs a piece of C++ with a static or a thread-local (torch.set_num_threads and
    torch.Generator at the worker's start-up, a collate or transform op's first call) it takes a glibc lock
    (the exit-handler lock, the dynamic loader's) that one of those threads may have held at the fork, and
    waits forever: seen once in CI, a worker stuck before its worker_init_fn, its rank hung and the orphan
    held the job's output open. forkserver forks workers from a one-threaded server instead (started with
    SLURM's warning signals blocked: it shares the rank's process group); fork keeps the hazard, but never
    leaves an orphan. (Doing torch's start-up calls once in the rank first was tried: the wait moved to the
    worker's next first-time call, a collate op's.) auto takes forkserver for dist_train's own datasets when the script
    run may be imported; a dataset of your own (data.file, the Trainer's) keeps fork, since its module (loaded
    from a file, or the script) may not import by name in a fresh process: data.worker_start=forkserver if it does.
    """
    # custom.IndexedDataset (data.file) wraps a user's dataset: not one of ours
    if resolve_worker_start(start, ours=dataset is None or isinstance(dataset, ImageDataset)) == "fork":
        return _ForkContext()
    _start_fork_server()
    return _ForkServerContext()


def resolve_worker_start(start: str, ours: bool) -> str:
    """data.worker_start with auto decided: the fork server for one of dist_train's datasets (`ours`) when the
    script run may be imported, else fork. worker_context and prestart_worker_server both ask here."""
    if start != "auto":
        return start
    return "forkserver" if ours and main_is_guarded() else "fork"


@functools.cache
def main_is_guarded() -> bool:
    """Whether the fork server may import the script being run: it has an `if __name__ == "__main__":`
    (or there is no script: an interactive session). Said once, on the main process, when not."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or getattr(getattr(main, "__spec__", None), "name", "").endswith("__main__"):
        return True  # no script, or `python -m package`: multiprocessing never imports those again
    try:
        guarded = re.search(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:", Path(path).read_text(), re.MULTILINE) is not None
    except (OSError, UnicodeDecodeError):
        guarded = False
    if not guarded and os.environ.get("RANK", "0") == "0":
        print(f"warning: {path} has no `if __name__ == \"__main__\":`; loader workers start by fork, which can "
              f"hang on a rare lock (docs/faults.md); put the script's work under that guard, or set "
              f"data.worker_start=fork to say so", file=sys.stderr, flush=True)
    return guarded


def prestart_worker_server(cfg: DataConfig) -> None:
    """Start the fork server at once when the workers will use it, so that its imports (about 3 s on 2 CPU
    cores) run beside the rank's own start-up instead of before its first batch."""
    if cfg.num_workers > 0 and resolve_worker_start(cfg.worker_start, ours=cfg.file is None) == "forkserver":
        _start_fork_server()


def _alone() -> bool:
    """Whether this process has one thread (every native one counted: gloo's, OpenMP's, the watchdog's)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:  # not Linux: say no, and the server starts as CPython starts it
        return False


@contextlib.contextmanager
def _server_forked_from_here():
    """While the rank still has one thread (config loaded, before any group, loader or watchdog), the fork server
    is a fork of it instead of a fresh interpreter that imports torch and torchvision again (about 4.5 s of CPU per
    rank: the first step 4.4-4.8 s sooner on 2 CPU cores, BENCHMARKS.md). No other thread, so no lock held by one is
    copied: what the server is for stays true. A rank with threads by then gets CPython's own start."""
    if not _alone():
        yield
        return
    from multiprocessing import util

    spawn = util.spawnv_passfds
    util.spawnv_passfds = functools.partial(_fork_server, spawn)
    try:
        yield
    finally:
        util.spawnv_passfds = spawn


def _fork_server(spawn, path: str, args: list[str], passfds) -> int:
    """util.spawnv_passfds for forkserver.ensure_running: its `-c` program run in a fork of this process, with
    only the descriptors it passes (as its exec would), ended by os._exit (no exit handler of the rank's runs)."""
    program = args[args.index("-c") + 1] if "-c" in args else ""
    if not program.startswith("from multiprocessing.forkserver import main"):
        return spawn(path, args, passfds)
    keep, fds = {0, 1, 2, *passfds}, [int(fd) for fd in os.listdir("/proc/self/fd")]
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        for fd in fds:
            if fd not in keep:
                try:
                    os.close(fd)  # the "alive" pipe's write end above all: the server ends when its rank does
                except OSError:
                    pass
        from multiprocessing import resource_tracker

        # the rank's tracker descriptor was closed above: the server starts, as a fresh one would, with none (its
        # workers are handed the rank's by each request); a stale number here could name a descriptor opened later
        resource_tracker._resource_tracker._fd = resource_tracker._resource_tracker._pid = None
        exec(program, {"__name__": "__mp_forkserver__"})
        status = 0
    except SystemExit as exc:  # the server's own way out: every client gone
        status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(status)


@functools.cache
def _start_fork_server() -> None:
    from multiprocessing import forkserver, resource_tracker

    forkserver.set_forkserver_preload(["__main__", "dist_train.data.datasets"])  # workers start with torch imported
    warnings = {signal.SIGTERM, signal.SIGUSR1}  # SLURM's, and torchrun's to the rank's group: blocked in the server
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, warnings)
    path = os.environ.get("PYTHONPATH")  # the server may not get our sys.path (CPython < 3.13.1): where we come from
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), path]))
    try:
        # The server starts its resource tracker first, and that start unblocks SIGTERM on its way out: a server
        # started after it died of the launcher's SIGTERM and took the workers with it. So the tracker first.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, warnings)
        with _server_forked_from_here():
            forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if path is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = path
