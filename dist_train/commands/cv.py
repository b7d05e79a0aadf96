"""K-fold cross-validation: each fold a normal run in <output_dir>/fold-<k>, then out-of-fold predictions and metrics.

    cross_validate(config)       every fold in turn on the processes launched (or cv.fold alone: a SLURM array task)
      train_fold(k)              fit() of the fold's config (its rows: data.load_splits, cv.fold), resumable on its own,
                                 then its best checkpoint predicts the rows it did not train on -> fold-<k>/oof.safetensors
      summarize()                once every fold is done: oof.csv (each training row once, from the fold that held it
                                 out), cv_summary.json (each metric per fold, their mean, and over the whole OOF set)

A fold is a plain run directory: `predict.py --checkpoint <output_dir>/fold-<k>` predicts with it alone, and
`predict.py --checkpoint <output_dir>` averages every fold's best (inference.expand_checkpoints).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dist_train.commands.distill import prepare_teacher
from dist_train.commands.inference import THRESHOLDS_FILE, predict_split
from dist_train.config import Config, fold_output_dir, resolve, to_dict
from dist_train.data.columns import distinct_count
from dist_train.data.tables import group_ids, ids_digest, split_source
from dist_train.errors import ConfigError, DataError
from dist_train.job.distributed import forget_process_group, is_main_process_env, say_main
from dist_train.loop.trainer import fit
from dist_train.models.tasks import Task, load_folds
from dist_train.rundir.checkpoint import complete_checkpoints
from dist_train.rundir.files import atomic_path, write_text_atomic
from dist_train.rundir.mlflow_runs import parent_run
from dist_train.rundir.report import RUN_INFO_FILE

OOF_FILE = "oof.csv"
SUMMARY_FILE = "cv_summary.json"
FOLD_PREDICTIONS = "oof.safetensors"
"""In each fold's run directory: the outputs of its best checkpoint on the rows it held out, in table order."""


def cross_validate(config: Config, resume: str | None = None, overwrite: bool = False, after_fold=None) -> dict | None:
    """Train the folds of `config` (all of them in turn, or cv.fold alone) and, once every fold is done, write oof.csv and
    cv_summary.json; returns the summary (None while folds remain). `resume`: "auto" continues each fold from its own
    newest checkpoint and skips finished folds; `overwrite` starts every fold afresh. `after_fold(k)`, called on every
    rank once fold k is done (a search's pruner), stops the run there when it returns True (the same on every rank)."""
    config = resolve(config)
    if resume not in (None, "auto"):
        raise ConfigError(f"--resume {resume}: with cv.folds, use --resume auto (each fold continues from its own "
                          f"checkpoints in {fold_output_dir(config.output_dir, 'k')}; finished folds are skipped)")
    if resume is None and not overwrite and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
        resume = "auto"  # a requeued SLURM job runs the same command again: it continues (as trainer.resume_argument)
    output_dir = Path(config.output_dir)
    if is_main_process_env():
        output_dir.mkdir(parents=True, exist_ok=True)
        whole = replace(config, cv=replace(config.cv, fold=None))  # the run's config, whichever fold this job trains
        write_text_atomic(output_dir / "config.yaml", yaml.safe_dump(to_dict(whole), sort_keys=False))
    folds = [config.cv.fold] if config.cv.fold is not None else list(range(config.cv.folds))
    # tracking.trackers with mlflow: a run for the cross-validation, the folds' runs nested under it, the OOF scores on it
    with parent_run(config.tracking, output_dir, is_main_process_env()) as log_parent:
        for fold in folds:
            train_fold(fold_config(config, fold), resume, overwrite)
            if after_fold is not None and after_fold(fold):
                return None
        remaining = [k for k in range(config.cv.folds) if fold_state(fold_output_dir(output_dir, k)) != "done"]
        if remaining:
            say_main(f"cv: fold(s) {', '.join(map(str, remaining))} of {config.cv.folds} not done yet; {OOF_FILE} and "
                     f"{SUMMARY_FILE} are written when the last one finishes")
            return None
        if not is_main_process_env():
            return None
        summary = summarize(config)
        log_parent({f"oof/{k[4:]}": v for k, v in summary["oof"].items() if isinstance(v, float)})
        return summary


def fold_config(config: Config, fold: int) -> Config:
    """Fold `fold`'s run: its own run directory, and cv.fold, which makes the data layer hold that fold out."""
    return replace(config, output_dir=str(fold_output_dir(config.output_dir, fold)), cv=replace(config.cv, fold=fold))


def fold_state(run_dir: Path) -> str:
    """done (trained, and its held-out rows predicted), trained (predictions missing), started (a checkpoint), or new."""
    info = run_dir / RUN_INFO_FILE
    finished = info.is_file() and "finished" in json.loads(info.read_text()) and (run_dir / "checkpoints" / "best").is_dir()
    if finished:
        return "done" if (run_dir / FOLD_PREDICTIONS).is_file() else "trained"
    return "started" if complete_checkpoints(run_dir / "checkpoints") else "new"


def train_fold(config: Config, resume: str | None, overwrite: bool) -> None:
    """One fold: trained (continued, with resume="auto"), then its best checkpoint predicts the rows it held out."""
    run_dir, fold = Path(config.output_dir), config.cv.fold
    state = fold_state(run_dir) if resume == "auto" else "new"
    where = f"fold {fold} of {config.cv.folds} ({run_dir})"
    if state == "done":
        say_main(f"cv: {where} is done: skipped")
        return
    if state != "trained":
        say_main(f"cv: {where}: {'continuing' if state == 'started' else 'training'}")
        if is_main_process_env():
            (run_dir / FOLD_PREDICTIONS).unlink(missing_ok=True)  # it would describe the previous training
        try:
            # distill.teacher: the teacher of this fold (never one that saw its rows), its outputs cached in the fold
            prepare_teacher(config, resume, overwrite)
            # "auto": fit decides under the fold's lock; a fold without a complete checkpoint starts from the beginning
            fit(config, resume=resume, overwrite=overwrite)  # else an existing run is refused unless overwrite
        finally:
            forget_process_group()
    try:
        predict_held_out(config)
    finally:
        forget_process_group()


def predict_held_out(config: Config) -> None:
    """The fold's best checkpoint on the rows it held out (the validation split; inference.tta and .weights apply),
    saved with a digest of their ids, so that the summary can tell a fold trained on other rows."""
    run_dir = Path(config.output_dir)
    prediction = predict_split(config, run_dir / "checkpoints" / "best", split="val")
    if prediction.accelerator.is_main_process:
        metadata = {"fold": str(config.cv.fold), "rows": str(len(prediction.row_ids)), "ids_sha256": ids_digest(prediction.row_ids)}
        with atomic_path(run_dir / FOLD_PREDICTIONS) as tmp:
            save_file({"outputs": prediction.outputs.float().contiguous()}, str(tmp), metadata=metadata)
        say_main(f"cv: fold {config.cv.fold}: predicted its {len(prediction.row_ids)} held-out rows")
    prediction.accelerator.wait_for_everyone()


def summarize(config: Config) -> dict:
    """oof.csv and cv_summary.json from the folds' saved predictions (main process), and the table printed."""
    records, _, task, folds = load_folds(config)
    outputs = torch.full((len(records.paths), task.num_outputs), float("nan"))
    for fold in range(config.cv.folds):
        rows = np.flatnonzero(folds == fold)
        outputs[torch.as_tensor(rows)] = _fold_outputs(config, fold, records.ids.take(rows))
    targets = records.targets
    losses = task.loss()(outputs, targets if targets.is_floating_point() else targets.clamp(min=0)).detach()
    tuned = nested_thresholds(task, outputs, targets, folds, config.cv.folds)
    per_fold = []
    for fold in range(config.cv.folds):
        rows = np.flatnonzero(folds == fold)
        info = json.loads((fold_output_dir(config.output_dir, fold) / RUN_INFO_FILE).read_text())
        held = records.take(rows)
        metrics = _scores(task, outputs[rows], targets[rows], losses[rows], held.groups,
                          tuned[0][fold] if tuned is not None else None)
        per_fold.append({"fold": fold, "rows": len(rows), "groups": distinct_count(held.split_groups) if held.split_groups else None,
                         "best_epoch": info["best"]["epoch"], "wall_seconds": round(info["wall_seconds"], 1), **metrics})
    names = [k for k in per_fold[0] if k.startswith("val_") and k != "val_samples"]
    summary = {
        "folds": config.cv.folds, "seed": config.seed if config.cv.seed is None else config.cv.seed,
        "group_column": config.data.group_column, "rows": len(records.paths), "monitor": config.checkpoint.monitor,
        "per_fold": per_fold,
        "mean": {k: float(np.mean([f[k] for f in per_fold])) for k in names},
        "std": {k: float(np.std([f[k] for f in per_fold])) for k in names},
        "oof": _scores(task, outputs, targets, losses, records.groups, tuned[0][folds] if tuned is not None else None),
    }
    output_dir = Path(config.output_dir)
    (output_dir / THRESHOLDS_FILE).unlink(missing_ok=True)  # (one of an earlier summary, under task.threshold=tune)
    if tuned is not None:  # the thresholds predict.py uses: tuned on every out-of-fold row
        summary["oof_thresholds_in_sample"] = _scores(task, outputs, targets, losses, records.groups, tuned[1])
        summary["thresholds"] = {
            "tuned_on": "oof", "beta": config.task.threshold_beta, "values": dict(zip(task.class_names, tuned[1].tolist())),
            "note": "oof and per_fold score each fold's rows with thresholds tuned on the other folds' out-of-fold "
                    "predictions (honest); oof_thresholds_in_sample with the thresholds tuned on all of them, which "
                    "predict.py uses (optimistic on these rows)"}
        task.use_thresholds(tuned[1])
        write_text_atomic(output_dir / THRESHOLDS_FILE, json.dumps(
            {"thresholds": tuned[1].tolist(), "classes": task.class_names,
             "tuned_on": f"the out-of-fold predictions of {output_dir.resolve()}", "beta": config.task.threshold_beta},
            indent=1))
    write_oof(output_dir / OOF_FILE, task, records.ids, folds, targets, outputs,
              task.predictions_at(outputs, tuned[0][folds]) if tuned is not None else None)
    write_text_atomic(output_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
    say_main(summary_table(summary, task.headline(), split_source(config.data, "train").table))
    if tuned is not None:
        in_sample = summary["oof_thresholds_in_sample"]
        say_main(f"cv: thresholds (task.threshold=tune): each fold above is scored at thresholds tuned on the other folds' "
                 f"out-of-fold rows; tuned on all of them (for predict.py: {output_dir / THRESHOLDS_FILE}) the out-of-fold "
                 f"rows score val_f1_samples {in_sample['val_f1_samples']:.4f}, val_f1_macro {in_sample['val_f1_macro']:.4f} "
                 f"(in-sample: optimistic)")
    say_main(f"cv: wrote {output_dir / OOF_FILE} and {output_dir / SUMMARY_FILE}; a submission from every fold's best: "
             f"predict.py --checkpoint {output_dir}")
    return summary


def _fold_outputs(config: Config, fold: int, ids: list[str]) -> torch.Tensor:
    """Fold `fold`'s saved predictions, checked to be of the rows it holds out now."""
    path = fold_output_dir(config.output_dir, fold) / FOLD_PREDICTIONS
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("ids_sha256") != ids_digest(ids):
        raise DataError(f"{path} holds the predictions of {metadata.get('rows', '?')} other rows than the {len(ids)} fold "
                        f"{fold} holds out now (the training table, data.group_column or cv.seed changed since it "
                        f"trained): train it again (--overwrite, or cv.fold={fold} --overwrite)")
    return load_file(str(path))["outputs"]


def _scores(task: Task, outputs: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, groups, thresholds=None) -> dict:
    if thresholds is None:
        metrics = task.metrics(outputs, targets, losses, group_ids(groups))
    else:
        metrics = task.metrics_at(outputs, targets, losses, thresholds)
    return {k: v for k, v in metrics.items() if k.startswith("val_") and isinstance(v, (int, float))}


def nested_thresholds(task: Task, outputs: torch.Tensor, targets: torch.Tensor, folds: np.ndarray, count: int):
    """task.threshold=tune (multi-label): ((folds, classes) thresholds of each fold tuned on the other folds' out-of-fold
    rows, (classes,) thresholds tuned on all of them); None for any other task or a fixed threshold. A threshold tuned on
    the rows it scores flatters them as a hold-out tuned to itself does: each fold is scored with the other folds'."""
    if task.kind != "multilabel" or task.thresholds is not None:
        return None
    others = [torch.as_tensor(folds != k) for k in range(count)]
    return np.stack([task.thresholds_for(outputs[rows], targets[rows]) for rows in others]), task.thresholds_for(outputs, targets)


def write_oof(path: Path, task: Task, ids: list[str], folds: np.ndarray, targets: torch.Tensor, outputs: torch.Tensor,
              predictions: list[str] | None = None) -> None:
    """id, fold, target, prediction (as the submission writes them; multi-label under task.threshold=tune: at its
    fold's thresholds, tuned on the other folds, as cv_summary.json's oof scores them) and, for classes,
    prob_<class>, in table order."""
    columns = {"id": ids, "fold": folds.tolist(), "target": task.target_labels(targets),
               "prediction": predictions if predictions is not None else task.predictions(outputs)}
    if task.class_names is not None:
        probabilities = task.probabilities(outputs)
        columns.update({f"prob_{name}": [f"{p:.6g}" for p in probabilities[:, c].tolist()]
                        for c, name in enumerate(task.class_names)})
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(zip(*columns.values()))


def summary_table(summary: dict, headline: list[str], table: Path) -> str:
    """The folds' metrics, their mean and the OOF set's, as aligned text."""
    names = [k for k in headline if k in summary["oof"]]
    group = f", grouped by {summary['group_column']}" if summary["group_column"] else ""
    lines = [f"cv: {summary['folds']} folds of {table} ({summary['rows']} rows{group}, seed {summary['seed']})",
             f"{'fold':>6} {'rows':>6} " + " ".join(f"{k:>14}" for k in names)]
    lines += [f"{f['fold']:>6} {f['rows']:>6} " + " ".join(f"{f[k]:>14.4f}" for k in names) for f in summary["per_fold"]]
    lines.append(f"{'mean':>6} {'':>6} " + " ".join(f"{summary['mean'][k]:>14.4f}" for k in names))
    lines.append(f"{'oof':>6} {summary['rows']:>6} " + " ".join(f"{summary['oof'][k]:>14.4f}" for k in names))
    return "\n".join(lines)
