"""`dist-train new`: a project that works as created -- its smoke test passes, its config trains on 2 processes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import BIN, ROOT, read_jsonl, run_env

from dist_train.config import load_config

TRAIN = 1257  # the digits' training split, the project's example data


def run(args: list[str], cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    """A command run where the user stands (the project's parent), with this checkout's dist_train."""
    return subprocess.run(args, cwd=cwd, env=run_env(), capture_output=True, text=True, timeout=timeout)


def new(cwd, name: str = "my_project") -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dist_train", "new", name], cwd)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    parent = tmp_path_factory.mktemp("user")
    proc = new(parent)
    assert proc.returncode == 0, proc.stderr
    return parent, proc.stdout


def test_new_writes_a_project_and_says_what_to_run(project):
    parent, stdout = project
    directory = parent / "my_project"
    names = {"config.yaml", "model.py", "dataset.py", "loss.py", "test_smoke.py", "README.md", "accelerate_config.yaml", "data"}
    assert {p.name for p in directory.iterdir()} == names
    assert "  pytest my_project" in stdout
    launch = ("  accelerate launch --config_file my_project/accelerate_config.yaml --num_processes 2 -m dist_train train "
              "--config my_project/config.yaml")
    assert launch in stdout
    assert launch.strip() in (directory / "README.md").read_text()
    config = load_config(directory / "config.yaml")
    assert (config.model.file, config.data.file, config.loss.file) == tuple(
        str(directory / f) for f in ("model.py", "dataset.py", "loss.py"))
    assert config.output_dir == "runs/my_project"
    assert len((directory / "data" / "train.csv").read_text().splitlines()) == TRAIN + 1
    # the project's launch config is the repository's: a CPU machine needs its MULTI_GPU + cpu=True recipe
    assert yaml.safe_load((directory / "accelerate_config.yaml").read_text()) == yaml.safe_load(
        (ROOT / "accelerate_config.yaml").read_text())


def test_its_smoke_test_passes(project):
    parent, _ = project
    proc = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "my_project"], parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 passed" in proc.stdout


def test_its_config_trains_on_two_processes_with_the_printed_command(project):
    parent, stdout = project
    launch = next(line for line in stdout.splitlines() if "accelerate launch" in line).split()
    assert launch[:2] == ["accelerate", "launch"]
    # `-m dist_train train`: no path to a checkout; loader workers for the template's own dataset class (loaded from
    # its file under a name of its own: forked, the fork server could not import it)
    proc = run([str(BIN / "accelerate"), *launch[1:], "data.num_workers=2"], parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = parent / "runs" / "my_project"
    info = json.loads((out / "run_info.json").read_text())
    assert info["num_processes"] == 2 and info["train_samples"] == TRAIN and info["epochs_completed"] == 10
    digests = info["final_weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert all(m["rank_samples"] == [640, 640] for m in read_jsonl(out / "metrics.jsonl"))
    assert info["best"]["value"] > 0.9  # the template's model, data and loss learn the digits
    predicted = run([sys.executable, "-m", "dist_train", "predict", "--config", "my_project/config.yaml",
                     "--checkpoint", str(out / "checkpoints" / "best")], parent)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert len((out / "submission.csv").read_text().splitlines()) == len((parent / "my_project" / "data" / "info.csv").read_text().splitlines())


def test_new_refuses_a_directory_that_is_not_empty(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    proc = new(tmp_path, "mine")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: mine already exists and is not empty; choose a new directory (nothing was written)"
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    assert new(tmp_path, "empty").returncode == 0  # an empty directory is fine


def test_the_dist_train_command_is_this_main():
    """`dist-train new ...` (setup.py's console script) runs what `python -m dist_train new ...` runs."""
    assert '"dist-train = dist_train.commands.scaffold:main"' in (ROOT / "setup.py").read_text()
    assert "from dist_train.commands.scaffold import main" in (ROOT / "dist_train" / "__main__.py").read_text()
