"""`make gpu-check` runs here in its dry mode, end to end, so that the script a lent GPU machine runs cannot rot:
every CUDA step skipped with its reason, the CPU steps run and pass, the report complete, the exit code right."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_env

STEPS = ["environment", "cpu-tests", "gpu-tests", "train-predict", "two-processes", "bench-data", "bench", "bench-compile"]
CPU_STEPS = {"environment", "cpu-tests"}


def test_dry_mode_skips_every_cuda_step_and_passes_the_rest(tmp_path):
    out = tmp_path / "report"
    # without a GPU the dry mode is automatic; on a GPU machine this test asks for it
    cmd = ["make", "-s", "-C", str(ROOT), "gpu-check", f"OUT={out}", f"WORK={tmp_path / 'work'}", f"PYTHON={sys.executable}",
           *(["DRY=1"] if torch.cuda.is_available() else [])]
    # its cpu-tests step runs two of its files (the suite runs all of them itself: 35 s of the step here)
    files = "tests/test_policy.py,tests/test_losses.py"
    proc = subprocess.run(cmd, env=run_env(GPU_CHECK_CPU_TESTS=files), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(os.listdir(out)) == ["gpu_report.json", "gpu_report.md"]  # what comes back from a GPU machine
    report = json.loads((out / "gpu_report.json").read_text())
    assert report["result"] == "passed" and report["mode"] == "dry"
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == STEPS
    for name, step in steps.items():
        if name in CPU_STEPS:
            assert step["status"] == "passed" and not step["cuda"], step
        else:
            reason = "--dry was given" if torch.cuda.is_available() else "no CUDA device"
            assert step["cuda"] and step["status"] == "skipped" and reason in step["reason"], step
    counts = steps["cpu-tests"]["details"]["counts"]
    assert counts["failed"] == 0 and counts["passed"] >= 20, counts
    assert {t["name"].split("::")[0] for t in steps["cpu-tests"]["details"]["tests"]} == {"test_policy", "test_losses"}
    assert steps["cpu-tests"]["title"] == "the suite's fast parts (policy, losses)"
    assert report["environment"]["packages"]["torch"] == torch.__version__.split("+")[0]
    markdown = (out / "gpu_report.md").read_text()
    assert markdown.startswith("# GPU check: PASSED (mode dry)")
    assert all(f"| {name} | " in markdown for name in STEPS)
    assert "# GPU check: PASSED (mode dry)" in proc.stdout  # the report is printed too (the GPU tool returns stdout)


def test_a_python_without_torch_fails_the_check_with_a_report_saying_so(tmp_path):
    """The orchestrator itself never imports torch: a broken torch is reported, not a traceback."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "torch.py").write_text("raise ImportError('this torch is broken on purpose')\n")
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), str(out), "--work", str(tmp_path / "work")],
                          env=run_env(PYTHONPATH=str(broken)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_report.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert report["result"] == "failed" and steps["environment"]["status"] == "failed"
    assert "cannot import torch" in steps["environment"]["reason"]
    assert all(steps[name]["status"] == "skipped" for name in STEPS[1:])
    assert "this torch is broken on purpose" in (out / "gpu_report.md").read_text()  # the log's tail is in the report


def test_bad_arguments_are_one_line_and_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), str(tmp_path / "w" / "out"),
                           "--work", str(tmp_path / "w")], env=run_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "must lie outside the work directory" in proc.stderr, proc.stderr


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_command_past_its_time_box_is_killed_with_everything_it_started(tmp_path):
    """One hang cannot eat the rest: the whole process group goes (a launcher's ranks, their loader workers)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import Check, TimeBoxed

    check = Check(tmp_path / "out", tmp_path / "work", 120, force_dry=True, rehearse=False, command="test")
    grandchild = tmp_path / "grandchild.pid"
    started = time.monotonic()
    with pytest.raises(TimeBoxed, match="ran past its 2 s time box"):
        check.run(check.steps["bench"], ["bash", "-c", f"sleep 300 & echo $! > {grandchild}; wait"], 2, tmp_path / "log")
    assert time.monotonic() - started < 15
    pid = int(grandchild.read_text())
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)
