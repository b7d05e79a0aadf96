"""predict(): shard the test set over all processes, gather, and write one submission in the input's order.

Several checkpoints (an ensemble) and test-time augmentation average their predictions (tasks.Task.average)
before the submission is written; the result does not depend on the number of processes.
"""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from torch import nn

from dist_train.config import Config, fold_output_dir, model_shaping_differences, resolve
from dist_train.config.locate import Located, locate
from dist_train.custom import user_datasets
from dist_train.data.columns import distinct_count
from dist_train.data.datasets import ModelInput, build_dataset, decodes_on_device
from dist_train.data.loaders import build_loader
from dist_train.data.splits import load_test_records
from dist_train.data.tables import group_ids
from dist_train.errors import CheckpointError, ConfigError, DataError
from dist_train.job.distributed import build_accelerator, main_print
from dist_train.loop.ranks import check_each_once, predict_gathered
from dist_train.models.losses import build_loss
from dist_train.models.networks import read_weights, trained_network
from dist_train.models.tasks import Task, build_task, label_names, load_table, load_task, task_for_datasets
from dist_train.rundir.checkpoint import CLASSES_FILE, EMA_FILE, MANIFEST_FILE, TRAINER_STATE_FILE, WEIGHTS_FILE, verify
from dist_train.rundir.mlflow_runs import attach
from dist_train.rundir.submission import write_submission


def resolve_weights(checkpoint: str | Path, which: str = "auto") -> Path:
    """A checkpoint directory (its model.safetensors, or ema.safetensors: `which` = ema, or auto when the run kept
    an average) or a weights file itself; inside a checkpoint written by dist_train, the weights are checked
    against its manifest first."""
    path = Path(checkpoint)
    if path.is_dir():
        if which == "ema" and not (path / EMA_FILE).is_file():
            raise CheckpointError(f"--checkpoint {checkpoint}: inference.weights=ema, but the run kept no moving average "
                                  f"(train.ema_decay)")
        weights = path / (EMA_FILE if which != "model" and (path / EMA_FILE).is_file() else WEIGHTS_FILE)
    else:
        weights = path
    if not weights.is_file():
        raise CheckpointError(f"--checkpoint {checkpoint}: no weights at {weights}")
    if (weights.parent / MANIFEST_FILE).is_file():
        verify(weights.parent, only=[weights.name, CLASSES_FILE, TRAINER_STATE_FILE])
    return weights


class FlipAverage(nn.Module):
    """Test-time augmentation: the prediction of an image and of its mirror image, averaged by the task."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.task.average([self.model(images), self.model(images.flip(-1))])


@dataclass
class Prediction:
    """A split predicted by every process and gathered: the rows' ids and the outputs (averaged over checkpoints and
    TTA views) and targets, in the input's order, on every rank."""

    accelerator: Accelerator
    task: Task
    row_ids: list[str]
    outputs: torch.Tensor
    targets: torch.Tensor
    groups: torch.Tensor | None
    checkpoints: int
    thresholds_from: str | None = None
    """Multi-label, task.threshold=tune: where the decision thresholds come from (one line)."""
    located: list[str] = field(default_factory=list)
    """What each --checkpoint was read as (config.locate), a line each."""
    homes: list[Path] = field(default_factory=list)
    """Where each --checkpoint's run is (config.locate's home: a checkpoint, a cross-validation run, ...)."""


def predict(config: Config, checkpoint: str | Path | list, output: str | Path | None = None, split: str = "test",
            limit: int | None = None, *, model: nn.Module | None = None, loss: nn.Module | None = None,
            dataset=None, last: bool = False) -> Path | None:
    """Write the submission CSV; returns its path on the main process (None elsewhere).

    `checkpoint`: one checkpoint (directory or weights file) or a list of them, whose predictions are averaged
    (probabilities for classes, values otherwise); a run directory stands for its `best` checkpoint, a cross-validation
    run's for its folds', a study's for its best trial's (config.locate; `last`: the `last` checkpoints instead). split="val" predicts the labelled validation split instead
    and also writes its metrics to `<output stem>.metrics.json`: the scores of a checkpoint, whatever the
    number of processes. `limit`: only the first that many samples (train.py --debug). `model` / `loss` /
    `dataset` (dist_train.Trainer) take the place of what the config builds; the weights are loaded into that model.
    """
    config = resolve(config)
    result = predict_split(config, checkpoint, split, limit, model=model, dataset=dataset, last=last)
    accelerator, task, outputs, targets = result.accelerator, result.task, result.outputs, result.targets
    path = Path(output or config.inference.output or Path(config.output_dir) / "submission.csv")
    if accelerator.is_main_process:
        for line in [*result.located, *([result.thresholds_from] if result.thresholds_from else [])]:
            main_print(accelerator, line)
        write_predictions(config, task, path, result.row_ids, outputs)
        main_print(accelerator, f"wrote {len(result.row_ids)} predictions from {accelerator.num_processes} process(es)"
                                f"{f' averaging {result.checkpoints} checkpoints' if result.checkpoints > 1 else ''}"
                                f"{' with flip TTA' if config.inference.tta == 'hflip' else ''} to {path}")
        if split == "test" and len(result.homes) == 1:  # tracking.trackers with mlflow: the submission joins the run
            run_id = attach(config.tracking, result.homes[0], path)
            if run_id is not None:
                main_print(accelerator, f"mlflow: {path.name} logged to the run {run_id}")
        if split == "val":
            clean = targets if targets.is_floating_point() else targets.clamp(min=0)
            losses = (build_loss(config.loss, task.num_outputs, given=loss) if loss is not None else task.loss())(outputs, clean)
            metrics = task.metrics(outputs, targets, losses, result.groups)
            path.with_suffix(".metrics.json").write_text(json.dumps(metrics, indent=1))
            main_print(accelerator, " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_") and isinstance(v, float)))
    accelerator.wait_for_everyone()
    return path if accelerator.is_main_process else None


def predict_split(config: Config, checkpoint: str | Path | list, split: str = "test", limit: int | None = None, *,
                  model: nn.Module | None = None, dataset=None, last: bool = False) -> Prediction:
    """Predict `split` (test, val, or table: every row of the training table) with the checkpoint(s), sharded over the
    launched processes and gathered on every rank (predict() writes it). A key of `config` that shapes the model must be
    the checkpoints' own (check_model_keys)."""
    if split == "val" and config.cv.folds and config.cv.fold is None:
        raise ConfigError(f"--split val of a cross-validation run: its out-of-fold predictions are "
                          f"{Path(config.output_dir) / 'oof.csv'}; a fold's own: --checkpoint {fold_output_dir(config.output_dir, 0)}")
    located = [locate(c, last=last) for c in (checkpoint if isinstance(checkpoint, (list, tuple)) else [checkpoint])]
    checkpoints = [path for found in located for path in found.checkpoints]
    if model is None:
        check_model_keys(config, checkpoints)
    weights = [resolve_weights(c, config.inference.weights) for c in checkpoints]
    accelerator = build_accelerator(
        seed=config.seed, mixed_precision=config.train.mixed_precision, timeout_s=config.train.distributed_timeout_s
    )
    with accelerator.main_process_first():
        task, dataset, row_ids, groups, on_device = prediction_data(config, checkpoints, weights, split, dataset, limit,
                                                                    accelerator.device)
    thresholds_from = None
    if task.kind == "multilabel" and task.thresholds is None:
        thresholds, thresholds_from = saved_thresholds(located, checkpoints, task.num_outputs)
        task.use_thresholds(thresholds)
    if distinct_count(row_ids) != len(row_ids):
        raise DataError(f"the {split} rows share ids (data.id_column, else the image paths): the predictions need one row per id")
    channels_last = config.train.channels_last if config.train.channels_last is not None else accelerator.device.type == "cuda"
    loader = accelerator.prepare_data_loader(build_loader(dataset, config.data, train=False, seed=config.seed))
    prepare_input = ModelInput(config.data, accelerator.device, on_device, torch.float32, channels_last)
    predictions, targets = [], None
    for path in weights:
        # Inference needs no DDP wrapper: each process runs its own copy of the weights on its shard.
        network = trained_network(config.model, task.num_outputs, config.data.channels, config.data.image_size,
                                  read_weights(path), given=model)
        network.to(accelerator.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        if config.inference.tta == "hflip":
            network = FlipAverage(network, task)
        out = predict_gathered(accelerator, network, loader, "predict", prepare_input=prepare_input)
        check_each_once(out["indices"], len(dataset), "inference")
        order = torch.argsort(out["indices"])
        predictions.append(out["logits"][order])
        targets = out["targets"][order]
    outputs = predictions[0] if len(predictions) == 1 else task.average(predictions)
    # The loader's persistent workers end here, their queues' semaphores released: left to the rank's os._exit
    # (cli.exit_process), they outlived it and the resource tracker warned of "leaked semaphore objects".
    loader = None
    accelerator.free_memory()  # (Accelerate keeps a reference to every loader it prepared)
    gc.collect()
    return Prediction(accelerator, task, list(row_ids), outputs, targets, groups, len(weights), thresholds_from,
                      [found.line() for found in located], [found.inner.home for found in located])


THRESHOLDS_FILE = "thresholds.json"
"""In a cross-validation run's directory (task.threshold=tune): the decision thresholds tuned on its OOF predictions."""


def saved_thresholds(located: list[Located], checkpoints: list, classes: int) -> tuple[list[float], str]:
    """The decision thresholds of task.threshold=tune for the checkpoints predicting, and where they come from (one
    line): a cross-validation run's own (tuned on its out-of-fold predictions: cv.py's thresholds.json; a soup of its
    folds carries them), else each checkpoint's (tuned on its validation split, trainer_state.json), averaged when
    several are. None saved: 0.5."""
    if len(located) == 1 and (located[0].home / THRESHOLDS_FILE).is_file():
        file = located[0].home / THRESHOLDS_FILE
        saved = json.loads(file.read_text())
        return saved["thresholds"], f"thresholds: tuned on {saved['tuned_on']} ({file})"
    found = []
    for checkpoint in checkpoints:
        state = Path(checkpoint) / TRAINER_STATE_FILE if Path(checkpoint).is_dir() else None
        saved = json.loads(state.read_text()).get("thresholds") if state is not None and state.is_file() else None
        if saved is not None:
            if len(saved) != classes:
                raise CheckpointError(f"{state}: {len(saved)} thresholds for {classes} classes")
            found.append(saved)
    if not found or len(found) < len(checkpoints):
        return [0.5] * classes, (f"thresholds: task.threshold=tune, but {'no' if not found else 'not every'} checkpoint "
                                 f"saved tuned thresholds: 0.5 for every class (task.threshold=<value> chooses)")
    if len(found) == 1:
        return found[0], f"thresholds: tuned on the validation split of {checkpoints[0]}"
    return (torch.tensor(found, dtype=torch.float64).mean(0).tolist(),
            f"thresholds: the mean of the {len(found)} checkpoints' own (each tuned on its validation split)")


def checkpoint_config_file(checkpoint: str | Path, last: bool = False) -> Path | None:
    """The config.yaml of what `checkpoint` names (config.locate): a checkpoint's, a run's, a cross-validation run's own,
    a study's best trial's, or the one beside a weights file; None when there is none."""
    found = locate(checkpoint, last=last)
    file = found.home / "config.yaml"
    return file if file.is_file() else None


def expand_checkpoints(checkpoints: list, last: bool = False) -> list[Path]:
    """The checkpoints to average: each path as config.locate reads it (a cross-validation run's directory stands for
    every fold's `best` checkpoint, a run directory for its own, a study's for its best trial's; `last`: theirs)."""
    return [path for checkpoint in checkpoints for path in locate(checkpoint, last=last).checkpoints]


def check_model_keys(config: Config, checkpoints: list) -> None:
    """A key that shapes the model (config.MODEL_SHAPING) must have the value the checkpoint was trained with: else an
    error naming the key and both values (instead of weights loaded into another network, or another task predicted)."""
    for checkpoint in checkpoints:
        differences = model_shaping_differences(_saved_config(checkpoint), config)
        if differences:
            key, saved, asked = differences[0]
            more = f" (also {', '.join(k for k, _, _ in differences[1:])})" if len(differences) > 1 else ""
            raise ConfigError(f"{key}: the checkpoint {checkpoint} was trained with {saved!r}, the config asks for {asked!r}"
                              f"{more}; a key that shapes the model must be the checkpoint's own (predict.py without "
                              f"--config takes the checkpoint's config.yaml)")


def _saved_config(checkpoint: str | Path) -> dict:
    file = checkpoint_config_file(checkpoint)
    return (yaml.safe_load(file.read_text()) or {}) if file is not None else {}


def prediction_data(config: Config, checkpoints: list, weights: list[Path], split: str, dataset, limit: int | None,
                    device: torch.device):
    """The task the checkpoints were trained for and what to predict: (task, dataset, row ids, ranking query ids,
    decode on the device). The labels come from the checkpoints' classes.json (a bare weights file: the training
    data's, or the user's dataset's `classes`)."""
    saved = [json.loads((w.parent / CLASSES_FILE).read_text()) if (w.parent / CLASSES_FILE).is_file() else None for w in weights]
    names = [label_names(s) if s is not None else None for s in saved]
    if any(n != names[0] for n in names):
        other = names.index(next(n for n in names if n != names[0]))
        raise CheckpointError(f"the checkpoints were trained on different labels ({checkpoints[0]}: {saved[0]}; "
                              f"{checkpoints[other]}: other labels)")
    labels = saved[0]
    user_sets = user_datasets(config.data, {split: dataset})  # None: the built-in dataset
    if user_sets is not None:
        if labels is None:  # a bare weights file: the dataset's `classes`, else model.num_classes
            labels = task_for_datasets(config, user_sets[split])[0]
        dataset = user_sets[split] if limit is None else user_sets[split].head(limit)
        return build_task(config, labels), dataset, dataset.row_ids(), group_ids(getattr(dataset, "groups", None)), False
    if split == "table":  # every row of the training table (a distillation teacher's outputs)
        records, data_labels, _ = load_table(config)
        labels = labels if labels is not None else data_labels
    elif split == "val" or labels is None:  # a bare weights file: the labels come from the training data
        _, val_records, data_labels, _ = load_task(config)
        labels = labels if labels is not None else data_labels
    if split != "table":
        records = val_records if split == "val" else load_test_records(config.data)
    if limit is not None:
        records = records.take(range(min(limit, len(records.paths))))
    on_device = decodes_on_device(config.data, device, [records])
    dataset = build_dataset(records, config.data, split, config.seed, on_device)
    return build_task(config, labels), dataset, records.ids, group_ids(records.groups), on_device


def write_predictions(config: Config, task: Task, path: Path, row_ids: list[str], outputs: torch.Tensor) -> None:
    """The submission: id, the task's prediction and (inference.probabilities) a probability column per class."""
    extra = {}
    if config.inference.probabilities:
        probabilities = task.probabilities(outputs)
        extra = {f"prob_{name}": [f"{p:.6g}" for p in probabilities[:, c].tolist()] for c, name in enumerate(task.class_names)}
    write_submission(path, list(row_ids), task.predictions(outputs), config.inference.id_column, config.inference.label_column, extra)
