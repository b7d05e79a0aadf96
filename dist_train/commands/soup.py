"""dist-train soup: a cross-validation run's folds averaged into one model (a uniform weight soup), its BatchNorm
statistics recomputed on the training table, written as a checkpoint that predict.py and dist-train export take.

    soup(cv_dir, output)      the folds' best checkpoints (the weights inference.weights picks: their EMA when kept),
                              refused unless one architecture trained from one initialisation (model keys, seed,
                              model.pretrained, tensor names and shapes); averaged in float64; BatchNorm statistics
                              recomputed (torch.optim.swa_utils.update_bn over the training table, evaluation transform)
      scores                  each fold's and the ensemble's out-of-fold scores (cv_summary.json), and -- on a labelled
                              table none of the folds trained on (data.val=...) -- each fold, the ensemble and the soup

Averaging weights works when the folds stay in one basin of the loss (same initialisation, fine-tuning from shared
pretrained weights, a short schedule); folds trained from scratch on their own can average into a worse model than
any of them: the scores say which it is for your models.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from dist_train.commands.inference import THRESHOLDS_FILE, predict_split, resolve_weights
from dist_train.config import MODEL_SHAPING, Config, CVConfig, flatten, load_config, to_dict
from dist_train.config.locate import locate
from dist_train.data.datasets import build_dataset
from dist_train.data.loaders import build_loader
from dist_train.data.tables import split_source
from dist_train.errors import ConfigError
from dist_train.job.distributed import forget_process_group
from dist_train.models.networks import has_batchnorm, read_weights, trained_network
from dist_train.models.tasks import build_task, load_table
from dist_train.rundir.checkpoint import CLASSES_FILE, WEIGHTS_FILE, write_manifest

SOUP_FILE = "soup.json"
"""In the soup's directory: what it averaged and the scores printed."""
SAME_INIT = ("seed", "model.pretrained")
"""Besides the keys that shape the model: what makes the folds start from the same weights."""


def soup(checkpoint: str | Path, output: str | Path, overrides: list[str] = (), overwrite: bool = False, log=print,
         last: bool = False) -> dict:
    """Average the folds of the cross-validation run `checkpoint` into a checkpoint directory `output` (config.yaml,
    classes.json, model.safetensors, manifest.json, soup.json); returns soup.json's content. `overrides`: changes to
    the run's config (data.root where the data is now; data.val=TABLE to score on rows none of the folds trained on).
    An `output` that exists and is not empty is refused unless `overwrite`. `checkpoint` may be a study whose best trial
    is a cross-validation run; `last`: the folds' `last` checkpoints instead of their `best`."""
    found = locate(checkpoint, last=last, accept=("cv",), wants="a cross-validation run's directory (a soup averages its "
                                                               "folds), or a study's whose best trial is one")
    cv_dir, output = found.inner.home, Path(output)
    log(found.line())
    if output.resolve() == cv_dir.resolve() or cv_dir.resolve() in output.resolve().parents:
        raise ConfigError(f"--output {output}: inside the cross-validation run {cv_dir}; choose a directory of its own")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"--output {output} exists and is not empty; choose another directory, or pass --overwrite")
    folds = list(found.checkpoints)
    config = load_config(cv_dir / "config.yaml", ["cv.folds=0", "cv.fold=null", *overrides])
    config = replace(config, output_dir=str(output), cv=CVConfig())
    check_same_architecture(folds)
    weights = [read_weights(resolve_weights(fold, config.inference.weights)) for fold in folds]
    labels = json.loads((folds[0] / CLASSES_FILE).read_text())
    task = build_task(config, labels)
    model = trained_network(config.model, task.num_outputs, config.data.channels, config.data.image_size,
                            average_weights(weights))
    recomputed = recompute_batchnorm(model, config) if has_batchnorm(model) else 0
    tuned = cv_dir / THRESHOLDS_FILE  # multi-label, task.threshold=tune: the folds' out-of-fold thresholds go with it
    write_checkpoint(output, model, config, labels, {THRESHOLDS_FILE: tuned.read_text()} if tuned.is_file() else {})
    log(f"soup: the {len(folds)} folds of {cv_dir} averaged into {output}"
        + (f" (BatchNorm statistics recomputed on the {recomputed} rows of the training table)" if recomputed else ""))
    report = {"folds": [str(f) for f in folds], "weights": config.inference.weights, "batchnorm_rows": recomputed,
              **scores(cv_dir, config, folds, output, last)}
    (output / SOUP_FILE).write_text(json.dumps(report, indent=1))
    log(score_table(report, task.headline()))
    return report


def check_same_architecture(folds: list[Path]) -> None:
    """Every fold has the first one's model keys, seed and pretrained weights, and the same tensors (names, shapes):
    else a ConfigError naming the first difference."""
    configs = [flatten(yaml.safe_load((fold / "config.yaml").read_text()) or {}) for fold in folds]
    keys = [k for k in configs[0] if (k.startswith(MODEL_SHAPING) and k != "model.freeze") or k in SAME_INIT]
    for fold, values in zip(folds[1:], configs[1:]):
        for key in keys:
            if values.get(key) != configs[0][key]:
                raise ConfigError(f"soup: {fold} was trained with {key}={values.get(key)!r}, {folds[0]} with "
                                  f"{configs[0][key]!r}: a soup averages the weights of one architecture trained from "
                                  f"one initialisation (the same model keys, seed and model.pretrained)")
    shapes = [{k: tuple(v.shape) for k, v in read_weights(resolve_weights(fold, "model")).items()} for fold in folds]
    for fold, found in zip(folds[1:], shapes[1:]):
        if found != shapes[0]:
            name = next(iter(sorted(set(found) ^ set(shapes[0]))), None) or next(k for k in found if found[k] != shapes[0][k])
            raise ConfigError(f"soup: {fold} and {folds[0]} differ in tensor {name} ({found.get(name)} vs "
                              f"{shapes[0].get(name)}): not one architecture")


def average_weights(weights: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of floating-point tensors (summed in float64: K equal tensors average to themselves
    exactly); integer buffers (BatchNorm's batch counter) keep the first's value."""
    averaged = {}
    for name, first in weights[0].items():
        if first.is_floating_point():
            total = torch.stack([w[name].double() for w in weights]).sum(0)
            averaged[name] = (total / len(weights)).to(first.dtype)
        else:
            averaged[name] = first.clone()
    return averaged


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, config: Config) -> int:
    """BatchNorm running statistics of `model` recomputed over the whole training table (as validation prepares its
    images); returns the rows seen. Averaged weights need statistics of their own: the folds' averaged statistics
    describe other networks' activations."""
    records, _, _ = load_table(config)
    dataset = build_dataset(records, config.data, "bn", config.seed)
    loader = build_loader(dataset, config.data, train=False, seed=config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    torch.optim.swa_utils.update_bn(loader, model, device=device)
    model.cpu().eval()
    return len(dataset)


def write_checkpoint(output: Path, model: torch.nn.Module, config: Config, labels, extra: dict[str, str] | None = None) -> None:
    """A checkpoint directory as predict.py and export read one: config.yaml, classes.json, model.safetensors (and the
    `extra` files: name -> text), sealed by manifest.json (written into a temporary directory, then renamed into place)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        (tmp / CLASSES_FILE).write_text(json.dumps(labels))
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        write_manifest(tmp)
        shutil.rmtree(output, ignore_errors=True)
        os.rename(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def scores(cv_dir: Path, config: Config, folds: list[Path], output: Path, last: bool = False) -> dict:
    """The folds' and the ensemble's out-of-fold scores (cv_summary.json), and, when data.val names a labelled table,
    every fold's, the ensemble's and the soup's on it."""
    found = {}
    summary_file = cv_dir / "cv_summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        found["oof"] = {"folds": [{k: v for k, v in f.items() if k.startswith("val_")} for f in summary["per_fold"]],
                        "ensemble": summary["oof"]}
    if config.data.val is None:
        return found
    held_out = {}
    ensemble = folds if last else [cv_dir]  # (the directory: with its out-of-fold thresholds, multi-label)
    for name, checkpoints in [*[(f"fold {k}", [fold]) for k, fold in enumerate(folds)], ("ensemble", ensemble),
                              ("soup", [output])]:
        try:
            prediction = predict_split(config, checkpoints, split="val")
        finally:
            forget_process_group()
        task, outputs, targets = prediction.task, prediction.outputs, prediction.targets
        losses = task.loss()(outputs, targets if targets.is_floating_point() else targets.clamp(min=0))
        metrics = task.metrics(outputs, targets, losses, prediction.groups)
        held_out[name] = {k: v for k, v in metrics.items() if k.startswith("val_") and isinstance(v, (int, float))}
    found["held_out"] = {"table": str(split_source(config.data, "val").table),
                         "rows": len(prediction.row_ids), "scores": held_out}
    return found


def score_table(report: dict, headline: list[str]) -> str:
    """The scores as aligned text: out of fold (each fold on its own held-out rows), then on the held-out table."""
    lines = []
    if "oof" in report:
        names = [k for k in headline if k in report["oof"]["ensemble"]]
        lines += ["out of fold (each fold's best on the rows it held out; the ensemble: oof.csv):",
                  f"{'':>10} " + " ".join(f"{k:>14}" for k in names)]
        lines += [f"{f'fold {k}':>10} " + " ".join(f"{f[n]:>14.4f}" for n in names) for k, f in enumerate(report["oof"]["folds"])]
        lines.append(f"{'ensemble':>10} " + " ".join(f"{report['oof']['ensemble'][n]:>14.4f}" for n in names))
    if "held_out" in report:
        held = report["held_out"]
        names = [k for k in headline if k in held["scores"]["soup"]]
        lines += [f"on {held['table']} ({held['rows']} rows none of the folds trained on):",
                  f"{'':>10} " + " ".join(f"{k:>14}" for k in names)]
        lines += [f"{name:>10} " + " ".join(f"{values[n]:>14.4f}" for n in names) for name, values in held["scores"].items()]
    else:
        lines.append("soup: no score of its own yet: every training row was trained on by some fold. Name a labelled "
                     "table none of them saw, e.g. data.val=val.csv, to score the soup beside the folds and the ensemble")
    return "\n".join(lines)
