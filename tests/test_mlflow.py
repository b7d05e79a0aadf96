"""MLflow against a real tracking server (`mlflow server`, SQLite backend, local artifacts, on a free loopback port; the
full `mlflow` of .venv/mlflow-server, which `make install` builds): a 2-process run killed and resumed is one MLflow run
with each step once, a cross-validation is a parent run with a run per fold, and a tracker that is missing or a server
that is not there is one line."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
from conftest import ROOT, assert_killed, config_path, run_cli, run_env, tiny_overrides

from dist_train.config import load_config
from dist_train.errors import ConfigError
from dist_train.job.faults import FAULT_ENV

SERVER = ROOT / ".venv" / "mlflow-server" / "bin" / "mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tracking server's URI; stopped (its whole process group) after the module."""
    assert SERVER.is_file(), f"no MLflow server at {SERVER}: make install builds it (tests/mlflow-server.txt)"
    root, port = tmp_path_factory.mktemp("mlflow"), free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([str(SERVER), "server", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            # (no job runner: its consumer processes come and go while the tests run; tracking needs none)
                            env=run_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_SERVER_JOB_ENABLE_PERIODIC_TASKS="false"))
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
        time.sleep(0.3)
    yield uri
    import psutil

    descendants = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for child in descendants:  # (any that left the server's process group)
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    log.close()


def args(digits_root, out, project: str, **extra) -> list[str]:
    return ["--config", config_path("digits.yaml"),
            *tiny_overrides(digits_root, out, **{"model.name": "mlp", "model.width": 8, "tracking.trackers": "[tensorboard, mlflow]",
                                                 "tracking.project": project, **extra})]


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def test_a_two_process_run_killed_and_resumed_is_one_mlflow_run_with_each_step_once(server, digits_root, tmp_path):
    env = {"MLFLOW_TRACKING_URI": server}
    run = args(digits_root, tmp_path, "killed", **{"checkpoint.every_n_steps": 7})
    killed = run_cli("train.py", run, processes=2, check=False, env={**env, FAULT_ENV: "kill@step:10"})
    assert_killed(killed)
    run_id = (tmp_path / "mlflow_run_id").read_text()
    resumed = run_cli("train.py", [*run, "--resume", "auto"], processes=2, env=env)
    assert "resumed from" in resumed.stdout and (tmp_path / "mlflow_run_id").read_text() == run_id

    mlflow = client(server)
    experiment = mlflow.get_experiment_by_name("killed")
    runs = mlflow.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    # 1257 rows, 32 per process on 2 processes: 20 steps an epoch, logged every step; 8-10 were replayed by the resume
    steps = [m.step for m in mlflow.get_metric_history(run_id, "train/loss")]
    assert steps == list(range(1, 41))
    assert [m.step for m in mlflow.get_metric_history(run_id, "val/accuracy")] == [20, 40]
    data = runs[0].data
    assert data.params["optim.lr"] == "0.003" and data.params["tracking.project"] == "killed"
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert data.metrics["final/best_val_accuracy"] == pytest.approx(info["best"]["value"])
    assert {a.path for a in mlflow.list_artifacts(run_id)} == {"config.yaml", "confusion_matrix.png"}


def test_a_cross_validation_is_a_parent_run_with_a_nested_run_per_fold(server, digits_root, tmp_path):
    run_cli("train.py", args(digits_root, tmp_path, "cv", **{"cv.folds": 2, "data.val": "null", "train.epochs": 1,
                                                             "tracking.images": "true"}),
            env={"MLFLOW_TRACKING_URI": server})
    mlflow = client(server)
    parent = (tmp_path / "mlflow_run_id").read_text()
    folds = mlflow.search_runs([mlflow.get_experiment_by_name("cv").experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in folds) == ["fold-0", "fold-1"]
    assert {r.info.run_id for r in folds} == {(tmp_path / f"fold-{k}" / "mlflow_run_id").read_text() for k in (0, 1)}
    summary = json.loads((tmp_path / "cv_summary.json").read_text())
    assert mlflow.get_run(parent).data.metrics["oof/accuracy"] == pytest.approx(summary["oof"]["val_accuracy"])
    assert "confusion_matrix.png" in {a.path for a in mlflow.list_artifacts(folds[0].info.run_id)}
    # the folds' submission joins the cross-validation's run
    proc = run_cli("predict.py", ["--checkpoint", str(tmp_path), "--output", str(tmp_path / "submission.csv")],
                   env={"MLFLOW_TRACKING_URI": server})
    assert f"mlflow: submission.csv logged to the run {parent}" in proc.stdout
    assert "submission.csv" in {a.path for a in mlflow.list_artifacts(parent)}


def test_a_missing_tracker_and_a_server_that_is_not_there_are_one_line(digits_root, tmp_path):
    with pytest.raises(ConfigError, match=r"^tracking.trackers: comet_ml is not installed here: pip install comet-ml$"):
        load_config(None, ["tracking.trackers=[comet_ml]"])
    nobody = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = run_cli("train.py", args(digits_root, tmp_path, "down"), check=False, env={"MLFLOW_TRACKING_URI": nobody})
    assert proc.returncode == 2 and time.monotonic() - started < 60
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: tracking: the MLflow tracking server at {nobody} does "
                                                           f"not answer (")
    proc = run_cli("train.py", args(digits_root, tmp_path / "on", "down", **{"tracking.mlflow_required": "false",
                                                                             "train.epochs": 1}),
                   env={"MLFLOW_TRACKING_URI": nobody})
    assert f"warning: tracking: the MLflow tracking server at {nobody} does not answer" in proc.stdout
    assert (tmp_path / "on" / "run_info.json").is_file() and not (tmp_path / "on" / "mlflow_run_id").exists()


def test_a_server_lost_mid_run_is_one_warning_and_the_run_goes_on(capsys, tmp_path):
    """What ResumableMLflow does when a call to the server fails in the middle of a run: one warning, then no more
    calls (the run logs to TensorBoard only), instead of the exception ending the epoch."""
    from dist_train.config import TrackingConfig
    from dist_train.rundir.mlflow_runs import ResumableMLflow

    tracker = ResumableMLflow(TrackingConfig(trackers=["tensorboard", "mlflow"]), tmp_path, resumed=False)
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("Connection refused")

    tracker._safely(failing, 1)
    tracker._safely(failing, 2)
    tracker.log({"train/loss": 0.5}, step=3)  # (would need the server: skipped once it was lost)
    assert calls == [(1,)] and tracker.lost
    out = capsys.readouterr().out
    assert out.count("warning: MLflow stopped answering (ConnectionError: Connection refused); the run goes on") == 1
