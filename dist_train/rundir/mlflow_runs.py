"""MLflow, when tracking.trackers names it: one MLflow run per run directory, nested under the run of its cross-validation
or study, continued (not duplicated) by a resumed run; only the main process talks to the server.

    connect(cfg)              the server checked once per process: one line (or a warning) when it does not answer
    ResumableMLflow           Accelerate's MLflowTracker with the run's id kept in <run dir>/mlflow_run_id, each (metric,
                              step) the killed run had logged skipped when its resume replays it, and a server lost
                              mid-run a warning (the run goes on), never a traceback mid-epoch
    parent_run(cfg, dir)      an MLflow run for a cross-validation run or a study, active while its folds or trials run
"""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

from accelerate.tracking import MLflowTracker

from dist_train.config import TrackingConfig
from dist_train.errors import ConfigError
from dist_train.rundir.logged import Held, mlflow_held

RUN_ID_FILE = "mlflow_run_id"
"""In a run directory (a cross-validation run's, a study's): the id of its MLflow run."""


def wanted(cfg: TrackingConfig) -> bool:
    return "mlflow" in cfg.trackers


def uri(cfg: TrackingConfig) -> str:
    return cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or "./mlruns (MLflow's default: no server)"


@functools.cache
def _probe(address: str | None) -> str | None:
    import mlflow

    if address:
        mlflow.set_tracking_uri(address)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        mlflow.search_experiments(max_results=1)
    except Exception as exc:  # requests' ConnectionError wrapped in MlflowException, a 5xx, a bad URI
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0][:200] if text else ''}"
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    return None


def connect(cfg: TrackingConfig) -> bool:
    """Whether MLflow is on for this process: named, and its server answering (checked once). A server that does not
    answer is a ConfigError, or with tracking.mlflow_required=false a warning and False."""
    if not wanted(cfg):
        return False
    problem = _probe(cfg.mlflow_uri)
    if problem is None:
        return True
    line = f"tracking: the MLflow tracking server at {uri(cfg)} does not answer ({problem})"
    if cfg.mlflow_required:
        raise ConfigError(f"{line}: start it, point MLFLOW_TRACKING_URI or tracking.mlflow_uri at it, or set "
                          f"tracking.mlflow_required=false to train without it")
    print(f"warning: {line}; training without MLflow (tracking.mlflow_required=false)", flush=True)
    return False


def saved_run_id(directory: Path) -> str | None:
    path = Path(directory) / RUN_ID_FILE
    return path.read_text().strip() if path.is_file() else None


class ResumableMLflow(MLflowTracker):
    """The run directory's MLflow run (nested under an active parent: a cross-validation's or a study's), continued
    when the run resumes: its id is kept in the run directory, each (metric, step) the killed run logged is not logged
    again (the server's histories read at the start), and the config's parameters are logged once, by the run that
    started it."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, resumed_at: int | None):
        import mlflow

        super().__init__(experiment_name=cfg.project, run_id=saved_run_id(run_dir), run_name=run_dir.name,
                         nested_run=mlflow.active_run() is not None)
        self.run_dir, self.resumed_at, self.held, self.lost = run_dir, resumed_at, Held("mlflow"), False

    def start(self):
        super().start()
        (self.run_dir / RUN_ID_FILE).write_text(self.active_run.info.run_id)
        if self.resumed_at is not None:  # what the killed run logged past its checkpoint is replayed: log each once
            from mlflow import MlflowClient

            pairs = mlflow_held(MlflowClient(), self.active_run.info.run_id, self.resumed_at)
            self.held = Held("mlflow", pairs, self.resumed_at)

    def store_init_configuration(self, values: dict):
        if self.resumed_at is None:  # (a parameter's value cannot change: an elastic resume's batch keys would be refused)
            self._safely(super().store_init_configuration, values)

    def log(self, values: dict, step: int | None = None, **kwargs):
        values = self.held.fresh(values, step)
        if values:
            self._safely(super().log, values, step=step, **kwargs)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        import mlflow

        self._safely(mlflow.log_artifact, str(path), folder)

    def log_figure(self, figure, name: str) -> None:
        import mlflow

        self._safely(mlflow.log_figure, figure, name)

    def _safely(self, call, *args, **kwargs):
        """A server lost in the middle of the run: said once, and the run goes on without MLflow."""
        if self.lost:
            return
        try:
            call(*args, **kwargs)
        except Exception as exc:  # requests' errors wrapped by MLflow: whatever the server or the network did
            self.lost = True
            print(f"warning: MLflow stopped answering ({type(exc).__name__}: {str(exc).strip()[:160]}); the run goes on, "
                  f"logging to TensorBoard only", flush=True)


@contextlib.contextmanager
def parent_run(cfg: TrackingConfig, directory: Path, main: bool):
    """While it is open: the MLflow run of a cross-validation run or a study (its id kept in `directory`), under which
    the folds' or trials' runs nest. Yields a function logging metrics to it (a no-op without MLflow)."""
    if not main or not connect(cfg):
        yield lambda metrics, step=None: None
        return
    import mlflow

    experiment = mlflow.get_experiment_by_name(cfg.project)
    experiment_id = experiment.experiment_id if experiment is not None else mlflow.create_experiment(cfg.project)
    run = mlflow.start_run(run_id=saved_run_id(directory), experiment_id=experiment_id, run_name=Path(directory).name,
                           nested=mlflow.active_run() is not None)
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / RUN_ID_FILE).write_text(run.info.run_id)
    try:
        yield lambda metrics, step=None: mlflow.log_metrics(metrics, step=step)
    finally:
        mlflow.end_run()


def attach(cfg: TrackingConfig, directory: Path, file: Path) -> str | None:
    """`file` (a submission) as an artifact of the MLflow run of `directory` (a run, a checkpoint of one, a
    cross-validation run: the nearest mlflow_run_id at or above it); the run's id, None when it has none. A server that
    does not answer is a warning here: the file is written already."""
    directory = Path(directory)
    run_id = next((saved_run_id(d) for d in (directory, directory.parent, directory.parent.parent) if saved_run_id(d)), None)
    if run_id is None or not wanted(cfg):
        return None
    try:
        if not connect(cfg):
            return None
        from mlflow import MlflowClient

        MlflowClient(cfg.mlflow_uri).log_artifact(run_id, str(file))
    except Exception as exc:  # (ConfigError of a server down, or the upload failing)
        print(f"warning: {file} not logged to MLflow run {run_id}: {str(exc).strip().splitlines()[0][:200]}", flush=True)
        return None
    return run_id

