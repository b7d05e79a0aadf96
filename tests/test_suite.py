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
    shutil.copy(ROOT / "tests" / "conftest.py", tests)
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
