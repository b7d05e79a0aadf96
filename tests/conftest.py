"""Shared fixtures: the digits written once per session, and helpers that start real (multi-)process runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from dist_train.data import materialize_digits

    root = tmp_path_factory.mktemp("data") / "digits"
    materialize_digits(root)
    return root


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


def command(script: str, args: list[str], processes: int = 1) -> list[str]:
    """`python script ...` for one process, `accelerate launch --num_processes N script ...` for more."""
    if processes == 1:
        return [sys.executable, str(ROOT / script), *args]
    return [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_config.yaml"),
            "--num_processes", str(processes), str(ROOT / script), *args]


def run_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def run_cli(script: str, args: list[str], processes: int = 1, timeout: int = 300, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a entry point to completion; `env` adds variables (e.g. DIST_TRAIN_FAULT)."""
    cmd = command(script, args, processes)
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(**(env or {})), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def config_path(name: str) -> str:
    return str(ROOT / "configs" / name)
