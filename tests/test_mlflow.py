"""MLflow against a real tracking server (`mlflow server`, SQLite backend, local artifacts, on a free loopback port; the
full `mlflow` of .venv/mlflow-server, which `make install` builds): a 2-process run killed and resumed is one MLflow run
with each step once, a cross-validation is a parent run with a run per fold, and a tracker that is missing or a server
that is not there is one line."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections import Counter

import pytest
from conftest import ROOT, assert_killed, config_path, read_jsonl, run_cli, run_env, tiny_overrides
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_train.config import load_config
from dist_train.errors import ConfigError
from dist_train.job.faults import FAULT_ENV
from dist_train.rundir.logged import wandb_history

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


# 1257 rows, 32 per process on 2 processes: 20 steps an epoch, every step logged; 2 epochs. Where rank 0 is killed, and
# the checkpoint the resume starts from (a periodic save never falls on an epoch's last step: the epoch's save follows):
KILLS = {
    # right after epoch 1's last optimizer step, before its evaluation: saved at 14; steps 15-20 are replayed and in the
    # trackers already, the evaluation at step 20 is replayed and is not (the old MLflow tracker dropped it)
    "before-evaluation": ({"checkpoint.every_n_steps": 7}, "kill@step:20", 14, "steps 15-20"),
    # right after epoch 1's evaluation, before the epoch's save: saved at 10; steps 11-20 and the evaluation replayed,
    # all in the trackers already
    "after-evaluation": ({"checkpoint.every_n_steps": 10}, "kill@evaluated:20", 10, "steps 11-20"),
}


@pytest.mark.parametrize("kill", KILLS)
def test_a_run_killed_and_resumed_holds_each_metric_once_in_every_tracker(kill, server, digits_root, tmp_path):
    """TensorBoard (as TensorBoard shows it), MLflow (the server's histories) and W&B (its offline runs' files, as a
    sync would upload them) each hold every (metric, step) of metrics.jsonl exactly once, and every training step's."""
    overrides, fault, saved, replayed = KILLS[kill]
    env = {"MLFLOW_TRACKING_URI": server, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    run = args(digits_root, tmp_path, f"killed-{kill}", **{"tracking.trackers": "[tensorboard, mlflow, wandb]", **overrides})
    assert_killed(run_cli("train.py", run, processes=2, check=False, env={**env, FAULT_ENV: fault}))
    run_id = (tmp_path / "mlflow_run_id").read_text()
    resumed = run_cli("train.py", [*run, "--resume", "auto"], processes=2, env=env)
    assert f"resumed from {tmp_path / 'checkpoints' / f'step-{saved:08d}'}" in resumed.stdout
    assert (tmp_path / "mlflow_run_id").read_text() == run_id
    lines = [line for line in resumed.stdout.splitlines() if "are kept, not logged again" in line]
    # (W&B: as much as wandb-core wrote before its process was killed with rank 0 -- nothing, offline, with wandb 0.31)
    # (TensorBoard: what is past the checkpoint is purged and logged again; at its step, see test_tensorboard_...)
    assert [line.split(":")[0] for line in lines if not line.startswith("wandb:")] == ["mlflow"], resumed.stdout
    assert all(re.fullmatch(rf"\w+: \d+ values the killed run logged for {replayed} are kept, not logged again", line)
               for line in lines), lines

    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [20, 40]
    # each rank's share of each epoch, the resumed one's counted from its start
    assert all(r["rank_batches"] == [20, 20] and r["rank_samples"] == [640, 640] for r in records), records
    expected = Counter([("train/loss", step) for step in range(1, 41)]
                       + [(key, r["step"]) for r in records for key in ("epoch", "train/epoch_loss", "val/accuracy", "val/loss")])
    keys = {key for key, _ in expected}

    mlflow = client(server)
    held = Counter((key, m.step) for key in keys for m in mlflow.get_metric_history(run_id, key))
    assert held == expected
    assert len(mlflow.get_metric_history(run_id, "final/best_val_accuracy")) == 1

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0}, purge_orphaned_data=True)
    events.Reload()
    tags = events.Tags()["scalars"]
    assert Counter((key, e.step) for key in keys for e in events.Scalars(key)) == expected
    assert [e.step for e in events.Scalars("val_f1_per_class/3")] == [20, 40]
    assert [e.step for e in events.Scalars("hparam/best_val_accuracy")] == [40] and "train/lr" in tags

    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # the killed run's and the resumed run's, one W&B run id
    rows = [row for folder in runs for row in wandb_history(next(folder.glob("run-*.wandb")))]
    assert Counter((key, row["global_step"]) for row in rows for key in row if key in keys) == expected
    for folder in runs:  # W&B's own row counter only goes forward within each process
        steps = [row["_step"] for row in wandb_history(next(folder.glob("run-*.wandb")))]
        assert steps == sorted(steps)

    info = json.loads((tmp_path / "run_info.json").read_text())
    data = mlflow.get_run(run_id).data
    assert data.params["optim.lr"] == "0.003" and data.params["tracking.project"] == f"killed-{kill}"
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

    tracker = ResumableMLflow(TrackingConfig(trackers=["tensorboard", "mlflow"]), tmp_path, resumed_at=None)
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
