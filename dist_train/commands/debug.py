"""`python train.py --config X --debug`: one process, a summary, an overfit-one-batch check, a few batches.

The few batches go through the real loop (`fit`, given `Limits`) and the real inference (`predict`),
fast_dev_run style, into `<output_dir>/debug`, with anomaly detection on and no loader workers, so that a
broken config fails in seconds, loudly, with a full traceback.
"""
from __future__ import annotations

import copy
import os
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import default_collate

from dist_train.commands.distill import prepare_teacher
from dist_train.commands.inference import predict
from dist_train.config import Config, preprocessing_summary
from dist_train.data.datasets import build_dataset
from dist_train.errors import ConfigError, TrainingError
from dist_train.job.layout import Layout
from dist_train.loop.build import Data, Given, Limits, build_network, load_data
from dist_train.loop.trainer import fit
from dist_train.models.networks import parameter_counts
from dist_train.models.optim import Schedule, build_optimizer, param_groups

TRAIN_BATCHES = 4
EVAL_BATCHES = 2
OVERFIT_STEPS = 50


def debug_config(config: Config) -> Config:
    """The config of the debug run: one epoch of a few batches, no workers, its own run directory."""
    return replace(
        config,
        output_dir=str(Path(config.output_dir) / "debug"),
        data=replace(config.data, num_workers=0),
        train=replace(config.train, epochs=1, max_steps=None, early_stopping_patience=0),
        checkpoint=replace(config.checkpoint, every_n_steps=None, every_n_minutes=None),
        inference=replace(config.inference, output=None),
        # a teacher runs live on the few batches (no pass over the whole table); an oof teacher has no models to run
        distill=replace(config.distill, live=config.distill.live or (
            config.distill.teacher is not None and not (config.cv.folds and config.distill.cv_targets == "oof"))),
    )


def run_debug(config: Config, config_path: str | None) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--debug runs one process: python train.py --config X --debug (no accelerate launch)")
    set_seed(config.seed)  # the weights the real run starts from
    data = load_data(config, Given())  # data.file's datasets, else the built-in ones
    model = build_network(config, data.task)
    print(f"debug: the run {config_path or 'the default config'} describes\n"
          f"{summary(config, model, *data.lengths(), data.task)}", flush=True)
    torch.autograd.set_detect_anomaly(True)
    images, targets = first_batch(config, data)
    first, last = overfit_one_batch(config, model, data.task.loss(), images, targets,
                                    torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"debug: overfit one batch ({len(targets)} images, {OVERFIT_STEPS} steps of {config.optim.name} "
          f"at lr {config.optim.lr:g}): loss {first:.4f} -> {last:.4f}, ok", flush=True)
    debug = debug_config(config)
    print(f"debug: now a few batches on one process, into {debug.output_dir}", flush=True)
    one_process = Layout(1, config.data.batch_size, config.train.grad_accum_steps)
    limits = Limits(train=TRAIN_BATCHES * one_process.global_batch, val=EVAL_BATCHES * eval_batch(config))
    prepare_teacher(debug, overwrite=True)  # distill.teacher: checked, and set up to teach
    fit(debug, overwrite=True, limits=limits)
    predict(debug, Path(debug.output_dir) / "checkpoints" / "last", limit=EVAL_BATCHES * eval_batch(debug))
    print("debug: train, validate, checkpoint and predict all ran; the config is ready for the real run", flush=True)


def first_batch(config: Config, data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    """The first training batch, decoded and augmented by the CPU path."""
    dataset = build_dataset(data.train, config.data, "train", config.seed) if data.built_in else data.train
    items = [dataset[i] for i in range(min(config.data.batch_size, len(dataset)))]
    return torch.stack([item[0] for item in items]), default_collate([item[1] for item in items])


def eval_batch(config: Config) -> int:
    return config.data.eval_batch_size or config.data.batch_size


def summary(config: Config, model: torch.nn.Module, train_len: int, val_len: int, task) -> str:
    """What the real run (not the debug one) will be: model size, batch, steps, the LR curve."""
    trainable, frozen = parameter_counts(model)
    megabytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    batch, accum = config.data.batch_size, config.train.grad_accum_steps
    layout = Layout(1, batch, accum, train_len)
    steps_per_epoch, total = layout.steps_per_epoch, layout.total_steps(config.train.epochs, config.train.max_steps)
    sched = config.scheduler
    model_name = f"{type(model).__name__} (model.file)" if config.model.file else config.model.name
    data_name = f"data.file {Path(config.data.file).name}" if config.data.file else config.data.source
    lines = [
        f"  model      {model_name}: {trainable + frozen:,} parameters ({trainable:,} trainable, {frozen:,} frozen), "
        f"{megabytes:.2f} MB of weights",
        f"  data       {data_name}: {train_len:,} training / {val_len:,} validation images, "
        f"{f'{task.num_outputs} classes' if task.kind == 'classification' else f'task {task.kind}, {task.num_outputs} outputs'}, "
        f"{preprocessing_summary(config.data)}",
        f"  batch      {batch} per process x {accum} accumulation = {layout.global_batch} per optimizer step on 1 process "
        f"(x N on N processes, with 1/N of the steps)",
        f"  steps      {steps_per_epoch} optimizer steps/epoch x {config.train.epochs} epochs = {total} steps (1 process); "
        f"{sched.name} schedule, warm-up {sched.warmup_epochs:g} epoch(s)",
        f"  LR preview {lr_preview(config, steps_per_epoch, total, model)}",
    ]
    return "\n".join(lines)


def lr_preview(config: Config, steps_per_epoch: int, total: int, model: torch.nn.Module | None = None) -> str:
    """The learning rate at a few optimizer steps of the real run, from the real Schedule; with optim.layer_decay
    also each layer group's (the groups `model` gets), at the step where the LR peaks."""
    groups = param_groups(model, 0.0, True, config.optim.layer_decay) if model is not None else [{}]
    # one stand-in tensor per group: the schedule sees the real groups' LRs, no real weights are touched
    dummy = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": config.optim.lr * g.get("lr_scale", 1.0),
                              **({"lr_scale": g["lr_scale"], "name": g["name"]} if "lr_scale" in g else {})} for g in groups],
                            lr=config.optim.lr)
    schedule = Schedule(config.scheduler, dummy, steps_per_epoch, total, config.checkpoint.mode)
    points = sorted({1, schedule.warmup_steps, total // 4, total // 2, 3 * total // 4, total} - {0})
    values, per_group = {}, {}
    for step in range(1, total + 1):
        dummy.step()
        schedule.step()
        if step in points:
            values[step] = schedule.lr()
            per_group[step] = schedule.group_lrs()
    text = " | ".join(f"step {s}: {v:.2e}" for s, v in values.items())
    text += "  (then ReduceLROnPlateau on " + config.checkpoint.monitor + ")" if config.scheduler.name == "plateau" else ""
    peak = max(values, key=values.get)
    if per_group[peak]:
        layers = ", ".join(f"{tag.split('/')[1]} {lr:.2e}" for tag, lr in per_group[peak].items())
        text += (f"\n  LR groups  {len(per_group[peak])} layer groups (optim.layer_decay={config.optim.layer_decay:g}), "
                 f"at step {peak}: {layers}")
    return text


def overfit_one_batch(config: Config, model: torch.nn.Module, loss_fn, images: torch.Tensor, targets: torch.Tensor,
                      device: torch.device, steps: int = OVERFIT_STEPS) -> tuple[float, float]:
    """Train a copy of the model on one batch; a model that cannot memorise one batch has a bug.

    Raises TrainingError when the loss does not fall below half its first value.
    """
    trial = copy.deepcopy(model).to(device).train()
    images, targets = images.to(device), targets.to(device)
    optimizer = build_optimizer(config.optim, trial)
    losses = []
    for _ in range(steps):
        loss = loss_fn(trial(images), targets).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = losses[0], min(losses[-5:])
    if not last < 0.5 * first:
        raise TrainingError(
            f"overfit one batch: the loss went from {first:.4f} to {last:.4f} in {steps} steps of {config.optim.name} "
            f"(lr {config.optim.lr:g}) on one batch of {len(targets)}; a model that cannot memorise one batch has a bug: "
            f"check the labels, the learning rate, model.freeze and the loss")
    return first, last
