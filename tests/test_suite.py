"""How `make test` runs this suite: two workers (pytest-xdist), and the work units of tests/conftest.py."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from conftest import GROUPS_ENV, ROOT, run_env

pytest.importorskip("xdist")

MODULE = '''import time
import pytest

@pytest.fixture(scope="module")
def {fixture}():
    return 1
''' + "".join(f'''
def test_{i}({{fixture}}):
    time.sleep(0.2)

def test_plain_{i}():
    time.sleep(0.2)
''' for i in range(3))


def test_a_modules_shared_runs_and_the_slurm_modules_each_go_to_one_worker(tmp_path):
    """What xdist's own `xdist_group` marks no longer do under pytest 9.2: the tests of a module that share a
    module-scoped fixture run on one worker (which builds it once), and so do all those of the modules that start an
    emulated SLURM cluster (a fixture named `cluster`); the rest go where there is room."""
    tests = tmp_path / "tests"
    tests.mkdir()
    for name in ("conftest.py", "strays.py"):
        shutil.copy(ROOT / "tests" / name, tests)
    for name, fixture in (("slurm_a", "cluster"), ("slurm_b", "cluster"), ("trained", "run"), ("other", "run")):
        (tests / f"test_{name}.py").write_text(MODULE.format(fixture=fixture))
    env = {k: v for k, v in run_env().items() if not k.startswith(("PYTEST_", GROUPS_ENV))}  # a session of its own
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests", "-n", "2", "--dist", "loadgroup", "-v", "-p",
                           "no:cacheprovider"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = {m[2]: m[1] for m in re.finditer(r"\[(gw\d)\] \[ *\d+%\] PASSED (\S+)", proc.stdout)}
    assert len(ran) == 24, proc.stdout[-3000:]
    worker = lambda module, test: ran[f"tests/test_{module}.py::test_{test}"]  # noqa: E731
    assert len({worker(m, i) for m in ("slurm_a", "slurm_b") for i in range(3)}) == 1
    assert all(len({worker(m, i) for i in range(3)}) == 1 for m in ("trained", "other"))
    assert set(ran.values()) == {"gw0", "gw1"}


LEAVES = '''import subprocess
import sys

import pytest

SLEEP = [sys.executable, "-c", "import time; time.sleep(300)"]


@pytest.fixture(scope="module")
def server():
    return subprocess.Popen([*SLEEP, "module-stray"])  # never stopped


def test_leaves_one():
    subprocess.Popen([*SLEEP, "test-stray"])


def test_ends_its_own(server):
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    proc = subprocess.Popen(SLEEP)
    proc.kill()
    proc.wait()
'''


def test_a_process_left_running_by_a_test_or_a_module_fails_it_naming_the_process_and_is_ended(tmp_path):
    """tests/strays.py: a test that leaves a process running errors naming it; so does a module whose shared fixture
    left one; a test that ends what it started passes; and none of the strays still runs afterwards."""
    import psutil

    tests = tmp_path / "tests"
    tests.mkdir()
    for name in ("conftest.py", "strays.py"):
        shutil.copy(ROOT / "tests" / name, tests)
    (tests / "test_leaves.py").write_text(LEAVES)
    env = {k: v for k, v in run_env(DIST_TRAIN_STRAY_GRACE_S="1").items() if not k.startswith(("PYTEST_", GROUPS_ENV))}
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests", "-p", "no:cacheprovider", "-p", "no:randomly"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-3000:]
    assert re.search(r"2 passed, 2 errors", out), out[-3000:]
    assert re.search(r"tests/test_leaves.py::test_leaves_one left 1 process\(es\) running after it ended \(killed now\):"
                     r"\n +pid \d+: \S+ -c import time; time.sleep\(300\) test-stray", out), out[-3000:]
    assert re.search(r"test_leaves \(its module-scoped fixtures\) left 1 process\(es\) running .*\n.*module-stray", out), out
    assert "ERROR tests/test_leaves.py::test_ends_its_own" in out  # the module's error is reported at its last test
    left = [p for p in psutil.process_iter(["cmdline"]) if any("-stray" in part for part in p.info["cmdline"] or [])]
    assert not left, left
