"""Shared fixtures: the digits written once per session, and helpers that start real (multi-)process runs."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from dist_train.data.digits import materialize_digits

    root = tmp_path_factory.mktemp("data") / "digits"
    materialize_digits(root)
    return root


CACHE_ENV = "DIST_TRAIN_CACHE"
"""data.cache_dir's default (data/table_cache.py): a directory of the test session's, not the user's ~/.cache."""
GROUPS_ENV = "DIST_TRAIN_TEST_GROUPS"
"""The file where a `make test` worker writes each test's work unit for the scheduler (pytest-xdist's own marks,
`xdist_group`, are lost under pytest 9.2: xdist 3.8 renames `item._nodeid`, which 9.2 no longer reads)."""


def controls_workers(config: pytest.Config) -> bool:
    """This process is pytest-xdist's controller (its workers have `workerinput`)."""
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


try:
    import strays
except ImportError:  # no psutil (a GPU machine's own Python): no guard
    strays = None


def pytest_configure(config: pytest.Config) -> None:
    if strays is not None:
        strays.mark()  # in the controller and in each worker: what a test starts carries its worker's pid
    if not hasattr(config, "workerinput"):  # the session's own table cache, shared by its workers (and their runs)
        os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="dist_train-test-cache-")
    if controls_workers(config):  # before it starts its workers, which inherit the variable
        fd, path = tempfile.mkstemp(prefix="dist_train-test-units-", suffix=".json")
        os.close(fd)
        os.environ[GROUPS_ENV] = path


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ.pop(CACHE_ENV), ignore_errors=True)
    if controls_workers(config):
        Path(os.environ.pop(GROUPS_ENV)).unlink(missing_ok=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Work units for `make test`'s workers (`-n 2`): the tests of a module that share its module-scoped (or class-
    or package-scoped) fixtures (a trained run, a cluster) go to one worker, which builds them once; the modules that
    start an emulated SLURM cluster all go to one worker, one after another (two clusters at once would share one
    munged, and the first to stop ends it); every other test is a unit of its own."""
    worker = getattr(config, "workerinput", {}).get("workerid")
    if worker is None or GROUPS_ENV not in os.environ:
        return
    slurm_modules = {item.module.__name__ for item in items if "cluster" in getattr(item, "fixturenames", ())}
    units = {}
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        if fixtures and any(d.scope in ("module", "class", "package") for defs in fixtures.name2fixturedefs.values()
                            for d in defs):
            module = item.module.__name__
            units[item.nodeid] = "slurm" if module in slurm_modules else module
    path = Path(os.environ[GROUPS_ENV])  # every worker collects the same tests and writes the same units, each whole
    path.with_suffix(f".{worker}.tmp").write_text(json.dumps(units))  # before it reports its collection
    path.with_suffix(f".{worker}.tmp").replace(path)


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # a hook of pytest-xdist's: unknown where it is not installed
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadgroup` (and a bare `-n N`, xdist's `load`) with the units above, read once all workers have
    collected; without them (no file: workers started another way), every test is a unit of its own."""
    if config.getvalue("dist") not in ("load", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Units(LoadScopeScheduling):
        units: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.units is None:
                path = Path(os.environ.get(GROUPS_ENV, "/nonexistent"))
                self.units = json.loads(path.read_text() or "{}") if path.is_file() else {}
            return self.units.get(nodeid, nodeid)

    return Units(config, log)


@pytest.fixture(autouse=True)
def no_process_left_by_the_test(request):
    """A test ends with every process it started ended (tests/strays.py); set up first, so checked last."""
    before = strays.running() if strays is not None else {}
    yield
    left = strays.left_running(before) if strays is not None else {}
    if left:
        pytest.fail(strays.describe(left, request.node.nodeid), pytrace=False)


@pytest.fixture(autouse=True, scope="module")
def no_process_left_by_the_module(request):
    """The same for what a module's shared fixtures started (a cluster, a trained run), once they are torn down."""
    before = strays.running() if strays is not None else {}
    yield
    left = strays.left_running(before) if strays is not None else {}
    if left:
        pytest.fail(strays.describe(left, f"{request.module.__name__} (its module-scoped fixtures)"), pytrace=False)


def tiny_overrides(digits_root: Path, output_dir: Path, **extra) -> list[str]:
    """A fast digits run: 8x8 images, a couple of epochs, no workers, no augmentation."""
    values = {
        "data.root": str(digits_root),
        "data.image_size": 8,
        "data.num_workers": 0,
        "data.train_augment": "[]",
        "train.epochs": 2,
        "train.log_every_n_steps": 1,
        # a hang in a test ends in a stack dump of the hung rank (faults.Watchdog), well before the test's timeout
        "train.distributed_timeout_s": 120,
        "output_dir": str(output_dir),
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def accelerate_launch() -> list[str]:
    """`accelerate launch`: the script beside this Python, else the module (a system Python, like the GPU
    machines', may keep its scripts in another directory)."""
    script = BIN / "accelerate"
    return [str(script), "launch"] if script.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]


def command(script: str, args: list[str], processes: int = 1, launch: bool = False) -> list[str]:
    """`python script ...` for one process, `accelerate launch --num_processes N script ...` for more (or for
    one, with `launch`: DeepSpeed needs the launcher's environment)."""
    if processes == 1 and not launch:
        return [sys.executable, str(ROOT / script), *args]
    # a free port of the launcher's choosing, not its default 29500: `make test` runs two tests at a time
    return [*accelerate_launch(), "--config_file", str(ROOT / "accelerate_config.yaml"), "--main_process_port", "0",
            "--num_processes", str(processes), str(ROOT / script), *args]


def run_env(**extra: str) -> dict[str, str]:
    # this checkout first on the path: scripts under tests/ import dist_train where it is not installed (GPU machines)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def run_cli(script: str, args: list[str], processes: int = 1, timeout: int = 300, check: bool = True,
            env: dict[str, str] | None = None, launch: bool = False, forked: bool | None = None
            ) -> subprocess.CompletedProcess:
    """Run an entry point to completion; `env` adds variables (e.g. DIST_TRAIN_FAULT). The run is ranks forked from a
    warm server (tests/ranks.py: the same script, environment, gloo group and loader workers, without the launcher's
    ~8 s of start-up; a failed run's exit code is the first failed rank's own, each rank's in `rank_codes`);
    `forked=False` asks for the real launcher (or plain python) where it is what the test is about, as `launch` does
    (DeepSpeed on one GPU process)."""
    if forked is None:
        forked = not launch
    if forked:
        from ranks import run_ranks

        proc = run_ranks(script, args, processes, run_env(**(env or {})), timeout)
        cmd = [script, *args]
    else:
        cmd = command(script, args, processes, launch)
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=run_env(**(env or {})), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:  # what the run said before, not the exception's byte dump
            said = lambda out: (out or b"").decode(errors="replace") if isinstance(out, bytes) else (out or "")  # noqa: E731
            raise AssertionError(f"{' '.join(cmd)} did not end within {timeout} s\n--- stdout\n{said(exc.stdout)[-4000:]}"
                                 f"\n--- stderr\n{said(exc.stderr)[-8000:]}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}{' (forked ranks)' if forked else ''}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def assert_killed(proc: subprocess.CompletedProcess) -> None:
    """Rank 0 died of a SIGKILL (under the launcher: as its report says); forked ranks: its peer says it lost it."""
    assert proc.returncode != 0
    if hasattr(proc, "rank_codes"):
        assert proc.rank_codes[0] == -signal.SIGKILL and proc.returncode == -signal.SIGKILL, proc.rank_codes
        if len(proc.rank_codes) > 1:
            assert "rank 1: stopping: lost contact with rank 0" in proc.stderr, proc.stderr[-3000:]
    else:
        assert "exitcode  : -9" in proc.stderr, proc.stderr[-3000:]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def config_path(name: str) -> str:
    return str(ROOT / "configs" / name)


@pytest.fixture(scope="session")
def jpeg_digits(digits_root, tmp_path_factory) -> Path:
    """The digits as 24x24 JPEGs (CSV tables with the same ids)."""
    root = tmp_path_factory.mktemp("jpeg_digits")
    (root / "images").mkdir()
    for name in ("train.csv", "val.csv", "info.csv"):
        rows = list(csv.DictReader(open(digits_root / name, newline="")))
        for row in rows:
            target = Path(row["image"]).with_suffix(".jpg").name
            Image.open(digits_root / row["image"]).convert("RGB").resize((24, 24)).save(root / "images" / target, quality=95)
            row["image"] = f"images/{target}"
        with open(root / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return root
