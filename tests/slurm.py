"""A real SLURM cluster of two emulated nodes on this machine (Debian's slurmctld/slurmd + munge, as root).

Started for the SLURM tests, torn down by pid. `make slurm-deps` (run by .ci/run) installs the packages.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

CONF = """ClusterName=disttrain
SlurmctldHost={host}
FirstJobId={first_job}
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=30
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1_port} CPUs=1 RealMemory=1000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2_port} CPUs=1 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch")


def available() -> str | None:
    """None when a cluster can be started here, else why not."""
    if os.geteuid() != 0:
        return "the emulated SLURM cluster runs its daemons as root"
    missing = [d for d in DAEMONS if not Path(d).exists()]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): make slurm-deps"
    return None


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids: list[int] = []

    def start(self) -> "Cluster":
        for sub in ("state", "spool/n1", "spool/n2", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port = free_port()
        # job numbers of its own: launch/slurm_train.sbatch derives its port from the job's, and the clusters of two
        # test modules (run back to back by one `make test` worker) would otherwise both start at job 1
        self.conf.write_text(CONF.format(host=socket.gethostname(), root=self.root, ctld_port=ctld_port,
                                         first_job=1 + ctld_port % 10000, n1_port=free_port(), n2_port=free_port()))
        self._start_munge()
        subprocess.run(["/usr/sbin/slurmctld", "-i"], env=self.env, check=True, timeout=60)
        self.pids.append(self._pid("slurmctld.pid"))
        for node in ("n1", "n2"):
            subprocess.run(["/usr/sbin/slurmd", "-N", node], env=self.env, check=True, timeout=60)
            self.pids.append(self._pid(f"slurmd-{node}.pid"))
        deadline = time.time() + 60
        while self.run("sinfo", "-h", "-o", "%T").stdout.split() != ["idle"]:
            if time.time() > deadline:
                raise RuntimeError(f"the SLURM nodes did not come up: {self.run('sinfo').stdout}\n{self.logs()}")
            time.sleep(0.5)
        return self

    def _start_munge(self) -> None:
        # a live munged (not the zombie of the one the previous cluster stopped: pgrep counts those, and nothing here
        # reaps them before `make test`'s worker starts the next module's cluster)
        if any(p.info["name"] == "munged" and p.info["status"] != psutil.STATUS_ZOMBIE
               for p in psutil.process_iter(["name", "status"])):
            return
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, timeout=30)
        pid = Path("/run/munge/munged.pid")
        if pid.is_file():
            self.pids.append(int(pid.read_text()))

    def _pid(self, name: str) -> int:
        path = self.root / name
        deadline = time.time() + 30
        while not path.is_file() or not path.read_text().strip():
            if time.time() > deadline:
                raise RuntimeError(f"{name} never appeared\n{self.logs()}")
            time.sleep(0.1)
        return int(path.read_text())

    def stop(self) -> None:
        # the jobs first: their processes (launchers, ranks) would outlive the daemons, holding their ports and cores
        with contextlib.suppress(subprocess.SubprocessError, OSError):  # a stuck slurmctld: the daemons go all the same
            self.run("scancel", "--user", "root")
            deadline = time.time() + 60
            while self.run("squeue", "-h").stdout.strip() and time.time() < deadline:
                time.sleep(0.5)
        for proc in psutil.process_iter():  # and what left a job's process tracking (a daemon, a fork server)
            with contextlib.suppress(psutil.Error):
                if proc.environ().get("SLURM_CONF") == str(self.conf) and "SLURM_JOB_ID" in proc.environ():
                    proc.kill()
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(1)
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def run(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60, check=check)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RestartCnt, NodeList, ...)."""
        text = self.run("scontrol", "show", "job", job_id, "-o").stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait(self, job_id: str, states: set[str], timeout: float, seen: list[str] | None = None) -> dict[str, str]:
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "?")
            if seen is not None and (not seen or seen[-1] != state):
                seen.append(state)
            if state in states:
                return info
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout} s: {info}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").glob("*.log")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
