"""A run directory has one owner: `<output_dir>/.lock`, taken by the main process before the run touches anything,
refreshed while it runs, released when it ends; a lock whose holder is gone is taken over, saying so."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dist_train.errors import ConfigError

LOCK_FILE = ".lock"
HEARTBEAT_S = 10.0
"""The holder touches its lock this often (its modification time is the run's sign of life)."""
STALE_AFTER_S = 60.0
"""A lock held from another machine and untouched this long belongs to a run that is gone."""


def process_started(pid: int) -> str | None:
    """When process `pid` started (its start time in clock ticks since boot, /proc), None where unknown; with the pid
    it names one process, even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    return started is None or process_started(pid) in (None, started)


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: the record written into it."""

    host: str
    pid: int
    pid_started: str | None
    slurm_job: str | None
    slurm_restart: int
    started: str

    @classmethod
    def this_process(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), process_started(os.getpid()), os.environ.get("SLURM_JOB_ID"),
                   int(os.environ.get("SLURM_RESTART_COUNT", "0")), time.strftime("%Y-%m-%d %H:%M:%S %Z"))

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"a run started {self.started} (pid {self.pid} on host {self.host}{job})"

    def gone(self, age_s: float) -> str | None:
        """Why this holder's run is over, judged from here; None when it may still run. `age_s`: since the holder
        last touched the lock."""
        me = Holder.this_process()
        if self.slurm_job is not None and self.slurm_job == me.slurm_job and self.slurm_restart < me.slurm_restart:
            return f"SLURM requeued job {self.slurm_job}: this is its restart {me.slurm_restart}"
        if self.host == me.host:
            if self.pid == me.pid or not alive(self.pid, self.pid_started):
                return f"pid {self.pid} is no longer running on {self.host}"
            return None
        if age_s > STALE_AFTER_S:
            return f"its lock has not been refreshed for {age_s:.0f} s (a running holder refreshes it every {HEARTBEAT_S:g} s)"
        return None


class LockHeld(ConfigError):
    """The lock is another live run's: `in_use` says whose (a caller that waits says that; a run is also told what to do)."""

    def __init__(self, directory: Path, whose: str):
        self.in_use = f"{directory} is in use by {whose}"
        super().__init__(f"{self.in_use}; choose another output_dir, or wait")


class RunLock:
    """`<directory>/.lock` (or another `name`), created exclusively and whole (one creator wins: a hard link, else O_EXCL)."""

    def __init__(self, directory: Path, name: str = LOCK_FILE):
        self.directory, self.path = directory, directory / name
        self.holder: Holder | None = None
        self._stop = threading.Event()

    def acquire(self) -> str | None:
        """Take the lock. Returns a line to print when it took over the lock of a run that is gone; raises
        ConfigError when another run holds it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(5):
            me = Holder.this_process()
            try:
                self._create(me)
            except FileExistsError:
                note = self._take_over() or note
                continue
            self.holder = me
            threading.Thread(target=self._heartbeat, name="dist_train-runlock", daemon=True).start()
            return note
        raise ConfigError(f"{self.directory}: could not take {self.path.name} (other runs keep taking it); choose another "
                          f"output_dir, or wait")

    def _create(self, me: Holder) -> None:
        """The lock, whole or not at all: written under a name of its own, then hard-linked into place (link fails
        when the lock exists, as O_EXCL does), so that a run arriving at the same moment never reads it half
        written. Where the file system has no hard links, O_EXCL and then the record. Raises FileExistsError."""
        record = json.dumps(asdict(me))

        def write(path: Path, flags: int) -> None:
            with os.fdopen(os.open(path, os.O_CREAT | os.O_WRONLY | flags, 0o644), "w") as f:
                f.write(record)
                f.flush()
                os.fsync(f.fileno())

        staged = self.path.with_name(f"{self.path.name}.new-{socket.gethostname()}-{os.getpid()}")
        write(staged, os.O_TRUNC)
        try:
            os.link(staged, self.path)
            return
        except FileExistsError:
            raise
        except OSError:  # no hard links here (some network or FUSE file systems)
            pass
        finally:
            staged.unlink(missing_ok=True)
        write(self.path, os.O_EXCL)

    def _take_over(self) -> str | None:
        """Move a lock whose holder is gone out of the way (None: it vanished meanwhile); refuse a live one."""
        try:
            record, age = self.path.read_text(), time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = Holder(**json.loads(record))
        except (ValueError, TypeError):  # being written this very moment, or not ours: judged by its age alone
            holder = None
        if holder is not None:
            reason, whose = holder.gone(age), holder.describe()
        else:
            reason = f"it is unreadable and untouched for {age:.0f} s" if age > STALE_AFTER_S else None
            whose = f"another run (its {self.path.name} is unreadable: being written, or not dist_train's)"
        if reason is None:
            raise LockHeld(self.directory, whose)
        aside = self.path.with_name(f"{self.path.name}.gone-{socket.gethostname()}-{os.getpid()}")
        try:
            os.rename(self.path, aside)  # atomic: of two runs taking over at once, one moves it
        except FileNotFoundError:
            return None
        if aside.read_text() != record:  # it changed hands just now: put the live run's lock back, never over another
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink()
            raise LockHeld(self.directory, "another run that has just started")
        aside.unlink()
        return f"took over {self.path} from {whose}, which is gone: {reason}"

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if self._mine():
                try:
                    os.utime(self.path)
                except OSError:
                    pass

    def _mine(self) -> bool:
        try:
            return self.holder is not None and Holder(**json.loads(self.path.read_text())) == self.holder
        except (OSError, ValueError, TypeError):
            return False

    def release(self) -> None:
        """Remove the lock if this process still holds it (a run that took it over since keeps it)."""
        self._stop.set()
        if self._mine():
            self.path.unlink(missing_ok=True)
        self.holder = None
