"""Hyper-parameter search (hpo.trials > 0): an Optuna study over hpo.space whose objective is the cross-validated score,
shared by any number of workers through one journal file, each trial a normal run directory.

    tune(config)              this worker's part of the study, on every rank: trial after trial until the study has
                              hpo.trials of them
      Study.claim()           (main process, under the study's lock) a RUNNING trial whose worker is gone -- resumed
                              exactly: same number, same parameters, from its checkpoints -- else a new trial from the
                              sampler; the trial directory's lock is taken before the study's is released
      run_trial()             (every rank) the trial's config -> cross_validate (folds, OOF) or fit (hold-out); the
                              pruner's verdicts are taken on the main process and broadcast (agree)
      Study.finish()          (main process) the trial's value, or PRUNED / FAIL with its error, told to the journal
    hpo_report.report()       hpo_summary.json, best.yaml, the table, the pictures

Between two runs no process group exists (each fit builds its own, as cross-validation's folds do): the ranks agree on
a trial, or a pruning verdict, in a short-lived group of their own (agree).
"""
from __future__ import annotations

import math
import os
import shutil
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import yaml

from dist_train.commands.cv import cross_validate
from dist_train.commands.hpo_report import (
    JOURNAL_FILE,
    REPORT_FILES,
    STUDY_NAME,
    report,
    trial_dir,
    write_summary,
    write_trial_hparams,
)
from dist_train.config import Config, config_from_dict, fold_output_dir, hpo_objective, resolve, space_value, to_dict
from dist_train.errors import ConfigError, DistTrainError
from dist_train.job.distributed import (
    build_accelerator,
    forget_process_group,
    is_main_process_env,
    same_on_all_ranks,
    say_main,
)
from dist_train.loop.trainer import fit
from dist_train.rundir.files import write_text_atomic
from dist_train.rundir.mlflow_runs import parent_run
from dist_train.rundir.report import best_epoch_metric
from dist_train.rundir.runlock import LockHeld, RunLock

STUDY_LOCK = ".hpo.lock"
"""In the study's directory: held while a worker reads the study and claims a trial (one claim at a time)."""
TRIAL_LOCK = ".trial.lock"
"""In each trial's directory: held by the worker training it, from its claim to its result."""
LOCK_WAIT_S = 600
LOCK_SAY_AFTER_S = 2  # a wait on the study's lock longer than this is printed (once)


def tune(config: Config, resume: str | None = None, overwrite: bool = False) -> None:
    """This worker's trials of the study in config.output_dir, on every rank, until the study has hpo.trials (each
    worker started on the study -- another launch, a job array's task -- takes its own); then the report.
    `overwrite`: start the study afresh (its journal and trials deleted first; not with other workers running)."""
    config = resolve(config)
    if resume not in (None, "auto"):
        raise ConfigError(f"--resume {resume}: a study (hpo.trials) continues by itself: each worker resumes the trials "
                          f"whose worker is gone (from their checkpoints) and runs new ones; leave --resume out")
    study: Study | None = None
    outcome = None

    def decide(outcomes: list[dict | None]) -> dict | None:
        nonlocal study
        if study is None:
            study = Study(config, overwrite)
        if outcomes[0] is not None:
            study.finish(outcomes[0], [o["position"] for o in outcomes])
        return study.claim()

    # tracking.trackers with mlflow: a run for the study, each trial's run nested under it with its objective
    with parent_run(config.tracking, Path(config.output_dir), is_main_process_env()) as log_parent:
        try:
            while True:
                claim = agree(config, outcome, decide)
                if claim is None:
                    break
                say_main(claim["line"])
                outcome = run_trial(config, claim, study)
                if outcome.get("value") is not None:
                    log_parent({"objective": outcome["value"]}, step=claim["number"])
        finally:
            if study is not None:
                study.release()
    if study is not None:
        with study.locked():  # (no other worker's result lands between the journal read and the files written)
            report(config, study.study, trial_config)


def agree(config: Config, mine, decide):
    """Every rank's `mine` gathered to the main process, `decide(everyone's)` run there, its answer on every rank: in a
    process group of its own, ended after (each fit builds its own). An error of the input (DistTrainError) raised by
    `decide` ends every rank alike."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return decide([mine])
    from accelerate.utils import gather_object

    accelerator = build_accelerator(seed=config.seed, timeout_s=config.train.distributed_timeout_s)
    try:
        everyone = gather_object([mine])
        answer = None
        if accelerator.is_main_process:
            try:
                answer = ("ok", decide(everyone))
            except DistTrainError as exc:
                answer = ("error", exc.message())
        kind, value = same_on_all_ranks(accelerator, answer)
    finally:
        forget_process_group()
    if kind == "error":
        raise ConfigError(value)
    return value


def trial_config(config: Config, number: int, params: dict) -> Config:
    """Trial `number`: the study's config with the trial's parameters, in its own directory, no search of its own (its
    config.yaml trains it alone: train.py --config <output_dir>/trial-<n>/config.yaml)."""
    return config_from_dict(to_dict(config), {**params, "output_dir": str(trial_dir(config.output_dir, number)), "hpo": {}})


def run_trial(config: Config, claim: dict, study: Study | None) -> dict:
    """Train trial `claim` on every rank: its folds and their out-of-fold score (cv.folds), or one hold-out run, from its
    checkpoints where it has some. Returns this rank's outcome: state, value (the main process's), error, and where this
    rank stopped (position: the last fold, the epochs of a hold-out run)."""
    objective, _ = hpo_objective(config)
    position: dict = {"fold": None, "epoch": None}
    started = time.time()
    try:
        trial = trial_config(config, claim["number"], claim["params"])
        if config.cv.folds:
            def after_fold(fold: int) -> bool:
                position["fold"] = fold
                score = best_epoch_metric(fold_output_dir(trial.output_dir, fold), objective)
                if config.hpo.pruner == "wilcoxon":  # rank 0's verdict on every rank
                    return agree(config, None, lambda _: study.judge_fold(fold, score))
                if study is not None:  # no verdict to share: the main process records the fold's score
                    study.judge_fold(fold, score)
                return False

            summary = cross_validate(trial, resume="auto", after_fold=after_fold)
            pruned = position["fold"] < config.cv.folds - 1
            value = summary["oof"][objective] if summary is not None else None
        else:
            try:
                summary = fit(trial, resume="auto", judge=lambda epoch, metrics: study.judge_epoch(epoch, metrics[objective]))
            finally:
                forget_process_group()
            position["epoch"] = summary["epochs_completed"]
            pruned = "pruned_after_epoch" in summary
            value = best_epoch_metric(Path(trial.output_dir), objective) if is_main_process_env() else None
    except DistTrainError as exc:
        if exc.rank_local:  # one rank's failure (a bad image, out of memory): its peers may be waiting on it; the job ends
            raise
        return {"state": "FAIL", "value": None, "error": exc.message(), "position": position,
                "seconds": time.time() - started}
    if pruned:
        return {"state": "PRUNED", "value": None, "error": None, "position": position, "seconds": time.time() - started}
    return {"state": "COMPLETE", "value": value, "error": None, "position": position, "seconds": time.time() - started}


class Study:
    """The main process's handle on the study: its journal, its lock, the trial this worker runs."""

    def __init__(self, config: Config, overwrite: bool = False):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self.config, self.hpo, self.dir = config, config.hpo, Path(config.output_dir)
        self.objective, self.mode = hpo_objective(config)
        self.trial, self.trial_lock, self.number = None, None, None
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.locked():
            if overwrite:
                clear_study(self.dir)
            storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(self.dir / JOURNAL_FILE)))
            self.study = optuna.create_study(storage=storage, study_name=STUDY_NAME, load_if_exists=True,
                                             direction="maximize" if self.mode == "max" else "minimize",
                                             pruner=make_pruner(self.hpo))
            self._check_space()
        write_text_atomic(self.dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))

    @contextmanager
    def locked(self):
        """The study's lock: one worker at a time reads the study and claims a trial (a lock whose worker is gone is
        taken over, as a run directory's is)."""
        lock, started = RunLock(self.dir, STUDY_LOCK), time.time()
        said = False
        while True:
            try:
                lock.acquire()
                break
            except ConfigError as exc:
                waited, whose = time.time() - started, exc.in_use if isinstance(exc, LockHeld) else exc
                if waited > LOCK_WAIT_S:
                    raise ConfigError(f"hpo: waited {LOCK_WAIT_S} s for the study's lock: {whose}") from None
                if waited > LOCK_SAY_AFTER_S and not said:  # workers take it in turn for a moment; longer is news
                    say_main(f"hpo: waiting for the study's lock ({self.dir / STUDY_LOCK}), up to {LOCK_WAIT_S} s: {whose}")
                    said = True
                time.sleep(0.2)
        try:
            yield
        finally:
            lock.release()

    def _check_space(self) -> None:
        """A new study records its space and objective (and runs hpo.enqueue first); a study joined must have the same."""
        ours = {"space": {key: asdict(dim) for key, dim in self.hpo.space.items()}, "objective": self.objective,
                "direction": self.mode}
        theirs = self.study.user_attrs
        if not theirs and not self.study.get_trials(deepcopy=False):
            for key, value in ours.items():
                self.study.set_user_attr(key, value)
            for params in self.hpo.enqueue:
                self.study.enqueue_trial({k: space_value(self.hpo.space[k], v) for k, v in params.items()})
            return
        differ = [k for k in ours if theirs.get(k) != ours[k]]
        if differ:
            keys = sorted(k for k in set(ours["space"]) | set(theirs.get("space", {}))
                          if ours["space"].get(k) != theirs.get("space", {}).get(k))
            what = f"hpo.space differs at {', '.join(keys)}" if keys else f"{', '.join(differ)} differ"
            raise ConfigError(f"{self.dir} holds a study of another search ({what}: it has {theirs.get('objective')} "
                              f"({theirs.get('direction')}) over {', '.join(theirs.get('space', {}))}); continue it with "
                              f"the same hpo section, or pass --overwrite, or choose another output_dir")

    def claim(self) -> dict | None:
        """The next trial for this worker (None once the study has hpo.trials): a RUNNING trial whose worker is gone
        (its directory's lock free or stale) first, else a new one (an enqueued one first), sampled from hpo.seed + its
        number. Its directory's lock is taken before the study's lock is released: no two workers train one trial."""
        import optuna

        TrialState = optuna.trial.TrialState
        with self.locked():
            for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                lock = RunLock(trial_dir(self.dir, frozen.number), TRIAL_LOCK)
                try:
                    note = lock.acquire()
                except ConfigError:
                    continue  # its worker is alive
                self.trial_lock, self.number = lock, frozen.number
                self.trial = optuna.trial.Trial(self.study, frozen._trial_id)  # (the journal's id of that trial)
                self._note_worker(frozen.user_attrs.get("workers", []))
                return self._claimed(frozen.params, f"resumed: its worker is gone{f' ({note})' if note else ''}")
            counted = self.study.get_trials(deepcopy=False, states=tuple(s for s in TrialState if s != TrialState.WAITING))
            if len(counted) >= self.hpo.trials:
                return None
            seed = (self.config.seed if self.hpo.seed is None else self.hpo.seed) + len(counted)
            self.study.sampler = make_sampler(self.hpo, seed)
            self.trial = self.study.ask({key: distribution(dim) for key, dim in self.hpo.space.items()})
            self.number = self.trial.number
            self.trial_lock = RunLock(trial_dir(self.dir, self.number), TRIAL_LOCK)
            self.trial_lock.acquire()
            self._note_worker([])
            return self._claimed(self.trial.params, "")

    def _claimed(self, params: dict, how: str) -> dict:
        shown = ", ".join(f"{k}={_short(v)}" for k, v in params.items())
        line = f"hpo: trial {self.number} ({self.number + 1} of {self.hpo.trials}) in {trial_dir(self.dir, self.number)}: {shown}"
        return {"number": self.number, "params": dict(params), "line": f"{line}{f'; {how}' if how else ''}"}

    def _note_worker(self, before: list[str]) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        self.trial.set_user_attr("workers", [*before, f"{socket.gethostname()}:{os.getpid()}{f' (SLURM job {job})' if job else ''}"])

    def judge_fold(self, fold: int, score: float | None) -> bool:
        """After fold `fold` of a trial: its score reported; whether the pruner (wilcoxon) stops the trial here."""
        if score is None or fold in self._frozen().intermediate_values:
            return False  # (a fold done before a resume was reported then)
        self.trial.report(score, fold)
        stop = self.hpo.pruner == "wilcoxon" and fold < self.config.cv.folds - 1 and self.trial.should_prune()
        if stop:
            say_main(f"hpo: trial {self.number} pruned after fold {fold} ({fold + 1} of {self.config.cv.folds} folds): "
                     f"{self.objective} per fold so far is clearly worse than the best trial's")
        return stop

    def judge_epoch(self, epoch: int, value: float) -> bool:
        """After epoch `epoch` of a hold-out trial: its objective reported; whether the pruner (median) stops it here."""
        self.trial.report(value, epoch)
        return self.hpo.pruner == "median" and self.trial.should_prune()

    def finish(self, outcome: dict, positions: list[dict]) -> None:
        """The trial's result in the journal (a value that is not finite fails the trial), its lock released."""
        import optuna

        state, value, error = outcome["state"], outcome["value"], outcome["error"]
        if state == "COMPLETE" and (value is None or not math.isfinite(value)):
            state, error = "FAIL", f"the objective {self.objective} is {value}"
        self.trial.set_user_attr("stopped_at_per_rank", positions)
        self.trial.set_user_attr("seconds", round(outcome["seconds"], 1))
        if error is not None:
            self.trial.set_user_attr("error", error)
        with self.locked():
            self.study.tell(self.trial, value if state == "COMPLETE" else None, state=optuna.trial.TrialState[state])
            write_summary(self.config, self.study)
        verdict = f"{self.objective} {value:.4f}" if state == "COMPLETE" else (state if error is None else f"FAIL: {error}")
        say_main(f"hpo: trial {self.number}: {verdict} ({outcome['seconds'] / 60:.1f} min)")
        write_trial_hparams(self.dir, self._frozen(), self.objective)
        self.release()

    def _frozen(self):
        """The trial as the journal holds it now."""
        return next(t for t in self.study.get_trials(deepcopy=False) if t.number == self.number)

    def release(self) -> None:
        """The trial's lock, if this worker holds one (a trial left RUNNING is then resumed by the next worker)."""
        if self.trial_lock is not None:
            self.trial_lock.release()
        self.trial_lock = None


def make_sampler(hpo, seed: int):
    import optuna

    if hpo.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if hpo.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=hpo.startup_trials)
    # constant liar: the trials still running count as bad results, so that parallel workers sample elsewhere
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=hpo.startup_trials, constant_liar=True)


def make_pruner(hpo):
    import optuna

    if hpo.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=hpo.prune_startup_trials, n_warmup_steps=hpo.prune_warmup_epochs)
    if hpo.pruner == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=hpo.prune_p)
    return optuna.pruners.NopPruner()


def distribution(dim):
    """Optuna's distribution of a SearchDimension."""
    import optuna

    if dim.type == "categorical":
        return optuna.distributions.CategoricalDistribution(dim.choices)
    if dim.type == "int":
        return optuna.distributions.IntDistribution(int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
    return optuna.distributions.FloatDistribution(dim.low, dim.high, log=dim.log, step=dim.step)


def clear_study(directory: Path) -> None:
    """--overwrite: the study's journal, trials and reports go (the study's config and lock stay)."""
    for name in (JOURNAL_FILE, *REPORT_FILES):
        path = directory / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    for path in directory.glob("trial-*"):
        shutil.rmtree(path, ignore_errors=True)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
