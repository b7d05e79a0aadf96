"""What a study (commands/hpo.py) leaves for its reader: hpo_summary.json, best.yaml (the best trial's config, ready to
train), a table, the optimisation history and parameter importances as PNGs, and every trial in TensorBoard's HPARAMS
tab (<output_dir>/tensorboard/trial-<n>). Written by the main process of whichever worker ends last (the summary also
after each trial); a worker ending while others still train reports what the study holds then."""
from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import yaml

from dist_train.config import Config, hpo_objective, to_dict
from dist_train.rundir.files import write_text_atomic
from dist_train.config.locate import HPO_SUMMARY_FILE

JOURNAL_FILE = "hpo.journal"
"""The study: Optuna's journal (JournalFileBackend), a file every worker appends to; no server."""
STUDY_NAME = "dist_train"
BEST_CONFIG_FILE = "best.yaml"
HISTORY_PNG = "hpo_history.png"
IMPORTANCE_PNG = "hpo_importance.png"
TENSORBOARD_DIR = "tensorboard"
REPORT_FILES = (HPO_SUMMARY_FILE, BEST_CONFIG_FILE, HISTORY_PNG, IMPORTANCE_PNG, TENSORBOARD_DIR)


def trial_dir(output_dir: str | Path, number: int) -> Path:
    """Where trial `number` of the study in `output_dir` runs (a cross-validation run's directory with cv.folds)."""
    return Path(output_dir) / f"trial-{number}"


def minutes(trial) -> float | None:
    """From the trial's start (its first worker's claim) to its end, or to now while it runs."""
    if trial.datetime_start is None:
        return None
    import datetime

    end = trial.datetime_complete or datetime.datetime.now()
    return round((end - trial.datetime_start).total_seconds() / 60, 2)


def summary(config: Config, study) -> dict:
    """hpo_summary.json: the study's settings, every trial (number, params, value, state as Optuna names it, dir,
    minutes, each fold's or epoch's reported score, where each rank stopped, its workers, a failure's error) and the best."""
    objective, mode = hpo_objective(config)
    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "WAITING":
            continue
        # (Optuna keeps a pruned trial's last reported score as its value: not the objective, so not shown as one)
        trials.append({"number": t.number, "params": t.params, "value": t.value if t.state.name == "COMPLETE" else None,
                       "state": t.state.name,
                       "dir": trial_dir(".", t.number).name, "minutes": minutes(t),
                       "reported": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                       "stopped_at_per_rank": t.user_attrs.get("stopped_at_per_rank"),
                       "workers": t.user_attrs.get("workers", []), "error": t.user_attrs.get("error")})
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = None
    if complete:
        chosen = (max if mode == "max" else min)(complete, key=lambda t: t["value"])
        best = {"number": chosen["number"], "params": chosen["params"], "value": chosen["value"], "dir": chosen["dir"]}
    hpo = config.hpo
    return {"objective": objective, "direction": "maximize" if mode == "max" else "minimize",
            "scored_on": f"out-of-fold predictions of {config.cv.folds} folds" if config.cv.folds else "the hold-out split",
            "trials_asked": hpo.trials, "sampler": hpo.sampler, "pruner": hpo.pruner,
            "seed": config.seed if hpo.seed is None else hpo.seed,
            "states": {s: sum(t["state"] == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")},
            "trials": trials, "best": best}


def write_summary(config: Config, study) -> dict:
    result = summary(config, study)
    write_text_atomic(Path(config.output_dir) / HPO_SUMMARY_FILE, json.dumps(result, indent=1))
    return result


def report(config: Config, study, trial_config) -> dict:
    """Everything the study leaves, from what the journal holds now; the table printed. `trial_config(config, number,
    params)`: a trial's config (hpo.trial_config), for best.yaml."""
    output_dir = Path(config.output_dir)
    result = write_summary(config, study)
    print(table(result), flush=True)
    best = result["best"]
    if best is not None:
        best_config = replace(trial_config(config, best["number"], best["params"]), output_dir=str(output_dir / "best"))
        write_text_atomic(output_dir / BEST_CONFIG_FILE, yaml.safe_dump(to_dict(best_config), sort_keys=False))
        print(f"hpo: best trial {best['number']} ({result['objective']} {best['value']:.4f}): its config is "
              f"{output_dir / BEST_CONFIG_FILE} (train.py --config {output_dir / BEST_CONFIG_FILE}); a submission from it: "
              f"predict.py --checkpoint {output_dir}", flush=True)
    pictures(output_dir, study, result)
    return result


def table(result: dict) -> str:
    """trial, state, objective, minutes and each parameter, as aligned text."""
    names = sorted({k for t in result["trials"] for k in t["params"]})
    objective = result["objective"]
    width = max(len(objective), 8)
    head = f"{'trial':>5}  {'state':<8}  {objective:>{width}}  {'minutes':>7}  " + "  ".join(f"{n:>12}" for n in names)
    lines = [f"hpo: {len(result['trials'])} of {result['trials_asked']} trials, {objective} "
             f"({result['direction']}) on {result['scored_on']}", head]
    for t in result["trials"]:
        value = f"{t['value']:.4f}" if t["value"] is not None else "-"
        minutes_text = f"{t['minutes']:.1f}" if t["minutes"] is not None else "-"
        params = "  ".join(f"{_short(t['params'].get(n, '-')):>12}" for n in names)
        star = "  * best" if result["best"] and t["number"] == result["best"]["number"] else ""
        lines.append(f"{t['number']:>5}  {t['state']:<8}  {value:>{width}}  {minutes_text:>7}  {params}{star}")
    return "\n".join(lines)


def pictures(output_dir: Path, study, result: dict) -> None:
    """The optimisation history and (with at least 2 complete trials) the parameter importances, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (Optuna marks its matplotlib plots experimental)
        axes = plots.plot_optimization_history(study, target_name=result["objective"])
        axes.figure.savefig(output_dir / HISTORY_PNG, dpi=100, bbox_inches="tight")
        plt.close(axes.figure)
        if result["states"]["COMPLETE"] >= 2:
            axes = plots.plot_param_importances(study, target_name=result["objective"])
            axes.figure.savefig(output_dir / IMPORTANCE_PNG, dpi=100, bbox_inches="tight")
            plt.close(axes.figure)
    written = [output_dir / HISTORY_PNG]
    if result["states"]["COMPLETE"] >= 2:
        written.append(output_dir / IMPORTANCE_PNG)
    else:
        print(f"hpo: no parameter importances yet ({result['states']['COMPLETE']} complete trial(s); they need 2)", flush=True)
    print(f"hpo: wrote {', '.join(str(p) for p in written)}; every trial in TensorBoard's HPARAMS tab: tensorboard "
          f"--logdir {output_dir / TENSORBOARD_DIR}", flush=True)


def write_trial_hparams(output_dir: Path, trial, objective: str) -> None:
    """A finished trial in TensorBoard's HPARAMS tab: its parameters and state beside its objective (when complete),
    in an event file of its own, <output_dir>/tensorboard/trial-<n>."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    params = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in trial.params.items()}
    metrics = {f"hparam/{objective}": trial.value} if trial.value is not None else {}
    writer = SummaryWriter(str(output_dir / TENSORBOARD_DIR / trial_dir(".", trial.number).name))
    try:
        for part in hparams({**params, "state": trial.state.name}, metrics):
            writer._get_file_writer().add_summary(part)
        for key, value in metrics.items():
            writer.add_scalar(key, value, trial.number)
    finally:
        writer.close()


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
