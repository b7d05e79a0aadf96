"""Everything a run is made of, built from the config in the one order that the random draws and
`accelerator.prepare` need: the seed, data, model, the batch (found, then fitted to a resumed checkpoint), datasets
and loaders, loss, optimizer, prepare, then what depends on the prepared objects (schedule, guard, input
preparation, EMA, mixing)."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dist_train.config import Config
from dist_train.config.pretrained import describe_weights
from dist_train.custom import IndexedDataset, user_datasets
from dist_train.data.datasets import ModelInput, build_dataset, decodes_on_device
from dist_train.data.loaders import build_loader
from dist_train.data.mixing import BatchMixer
from dist_train.data.pseudo import pseudo_labelled, with_pseudo_labels
from dist_train.data.tables import Records, group_ids
from dist_train.errors import ConfigError, DistributedSetupError, is_out_of_memory
from dist_train.job import faults
from dist_train.job.distributed import main_print, unwrap
from dist_train.job.layout import Layout
from dist_train.loop import elastic
from dist_train.loop.elastic import Resumption, Saved
from dist_train.loop.guard import FiniteGuard
from dist_train.models.batchnorm import convert_sync_batchnorm
from dist_train.models.distill import (
    TEACHER_CACHE,
    TEACHER_SPEC,
    Distillation,
    cache_metadata,
    heads_of,
    live_teacher,
    read_cache,
)
from dist_train.models.ema import ModelEMA
from dist_train.models.losses import build_loss
from dist_train.models.networks import build_model, has_batchnorm, parameter_counts
from dist_train.models.optim import Schedule, build_optimizer
from dist_train.models.tasks import Task, load_task, task_for_datasets
from dist_train.rundir.checkpoint import describe_last


@dataclass
class Given:
    """Objects of the user's own (dist_train.Trainer) that take the place of what the config builds."""

    model: nn.Module | None = None
    loss: nn.Module | None = None
    train: Dataset | None = None
    val: Dataset | None = None


@dataclass(frozen=True)
class Limits:
    """At most this many training and validation samples (train.py --debug's few batches)."""

    train: int
    val: int


@dataclass
class Data:
    """The labelled splits and the task their labels define: the built-in records, or the user's datasets."""

    task: Task
    labels: list[str] | dict
    """What the labels define (tasks.fit_labels), saved with every checkpoint as classes.json."""
    train: Records | IndexedDataset
    val: Records | IndexedDataset
    pseudo: dict | None = None
    """data.pseudo_labels: what joined the training rows (data/pseudo.py)."""

    @property
    def built_in(self) -> bool:
        return isinstance(self.train, Records)

    def lengths(self) -> tuple[int, int]:
        return (len(self.train.paths), len(self.val.paths)) if self.built_in else (len(self.train), len(self.val))


@dataclass
class Parts:
    """What the loop runs on. `config` is the run's own (train.find_batch_size may have changed
    data.batch_size); `model` and `optimizer` are the prepared ones, `torch_optimizer` the torch optimizer inside."""

    config: Config
    layout: Layout
    model: nn.Module
    optimizer: torch.optim.Optimizer
    torch_optimizer: torch.optim.Optimizer
    train_set: Dataset
    train_loader: DataLoader
    loss_fn: nn.Module
    schedule: Schedule
    guard: FiniteGuard
    prepare_input: ModelInput
    task: Task | None = None
    labels: list[str] | dict | None = None
    val_set: Dataset | None = None
    val_loader: DataLoader | None = None
    val_groups: torch.Tensor | None = None
    """Ranking: each validation row's query id."""
    ema: ModelEMA | None = None
    mix: BatchMixer | None = None
    distill: Distillation | None = None
    """distill.teacher: the teacher's outputs for the training rows and the distillation loss."""
    pseudo: dict | None = None
    """data.pseudo_labels: the test rows that joined training (run_info.json's pseudo_labels)."""
    model_name: str = ""
    parameters: tuple[int, int] = (0, 0)
    """(trainable, frozen) parameter counts."""
    resumption: Resumption | None = None
    """How the run resumes its checkpoint (elastic.plan), when it resumes one."""


def build_parts(accelerator: Accelerator, config: Config, given: Given | None = None, limits: Limits | None = None,
                resuming: Saved | None = None) -> Parts:
    """The parts of a run (`resuming`: the checkpoint it will resume, whose layout may set the accumulation). The same
    seed on every rank gives identical initial weights before DDP even broadcasts them: nothing between the seed and
    the model's initialisation draws from torch's RNG but the user's datasets."""
    given = given or Given()
    refuse_combinations(config)
    set_seed(config.seed)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)
    with accelerator.main_process_first():  # the digits (or the user's data) are written once, by the main process
        data = load_data(config, given, limits)
    if data.pseudo is not None:
        main_print(accelerator, pseudo_line(data.pseudo))
    if config.model.pretrained and Path(config.model.pretrained).is_dir():  # one of our runs, a checkpoint, timm's folder
        main_print(accelerator, f"model.pretrained {config.model.pretrained}: {describe_weights(config.model.pretrained)}")
    model = build_network(config, data.task, given.model)
    model_name = config.model.name if given.model is None and config.model.file is None else type(model).__name__
    refuse_deepspeed_batchnorm(accelerator, config, model)
    config = fit_batch_size(accelerator, config, model)
    resumption = None
    if resuming is not None:  # the batch of this run is known: how it resumes the checkpoint's (elastic.plan)
        now = Layout(accelerator.num_processes, config.data.batch_size, config.train.grad_accum_steps)
        resumption = elastic.plan(resuming, now, elastic=config.train.elastic, max_steps=config.train.max_steps,
                                  deepspeed=config.deepspeed.enabled)
        config = with_accumulation(accelerator, config, resumption.now.accum)
    if config.model.sync_batchnorm:
        model = convert_sync_batchnorm(model, on_gpu=accelerator.device.type == "cuda")
    train_set, val_set, on_device = build_datasets(accelerator, config, data)
    train_loader = build_loader(train_set, config.data, train=True, seed=config.seed)
    val_loader = build_loader(val_set, config.data, train=False, seed=config.seed)
    parameters = parameter_counts(model)
    loss_fn = (build_loss(config.loss, data.task.num_outputs, given=given.loss) if given.loss is not None
               else data.task.loss()).to(accelerator.device)
    channels_last = config.train.channels_last if config.train.channels_last is not None else accelerator.device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    torch_optimizer = build_optimizer(config.optim, model, fused=not config.deepspeed.enabled)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, torch_optimizer, train_loader, val_loader)
    check_deepspeed_batch(accelerator, model, config)
    layout = Layout(accelerator.num_processes, config.data.batch_size, config.train.grad_accum_steps, len(train_set))
    if len(train_loader) != layout.batches_per_process:
        raise RuntimeError(f"the loader has {len(train_loader)} batches per process; the sharding layout the loop relies "
                           f"on gives {layout.batches_per_process}")
    return Parts(
        config=config, layout=layout, model=model, optimizer=optimizer, torch_optimizer=torch_optimizer,
        train_set=train_set, train_loader=train_loader, loss_fn=loss_fn,
        schedule=Schedule(config.scheduler, torch_optimizer, layout.steps_per_epoch,
                          layout.total_steps(config.train.epochs, config.train.max_steps), config.checkpoint.mode),
        guard=build_guard(accelerator, config, model, torch_optimizer),
        prepare_input=ModelInput(config.data, accelerator.device, on_device, input_dtype(model), channels_last),
        task=data.task, labels=data.labels, val_set=val_set, val_loader=val_loader,
        val_groups=group_ids(data.val.groups if data.built_in else getattr(val_set, "groups", None)),
        ema=ModelEMA(unwrap(accelerator, model), config.train.ema_decay, config.train.ema_warmup)
        if config.train.ema_decay is not None else None,
        mix=BatchMixer(config.data, data.task.num_outputs, config.seed, accelerator.process_index)
        if config.data.mixup_alpha > 0 or config.data.cutmix_alpha > 0 else None,
        distill=build_distillation(accelerator, config, data) if config.distill.teacher is not None else None,
        pseudo=data.pseudo, model_name=model_name, parameters=parameters, resumption=resumption,
    )


def refuse_combinations(config: Config) -> None:
    """What the config alone shows cannot run, refused before anything is built."""
    if config.train.ema_decay is not None and config.deepspeed.enabled and config.deepspeed.zero_stage == 3:
        raise ConfigError("train.ema_decay needs whole parameters on every rank; DeepSpeed ZeRO-3 partitions them "
                          "(use zero_stage 1 or 2, or DDP)")


def load_data(config: Config, given: Given, limits: Limits | None = None) -> Data:
    """The training and validation splits (at most `limits`) and their task: the user's datasets when given (or
    data.file), else the built-in tables."""
    user_sets = user_datasets(config.data, {"train": given.train, "val": given.val})
    if user_sets is None:
        train, val, labels, task = load_task(config)
        if limits is not None:
            train, val = train.take(range(min(limits.train, len(train.paths)))), val.take(range(min(limits.val, len(val.paths))))
        if config.data.pseudo_labels is not None:  # after the validation rows are chosen: never one of them
            rows, pseudo = pseudo_labelled(config.data, task.class_names, config.inference.id_column, task.kind == "multilabel")
            return Data(task, labels, with_pseudo_labels(train, rows, task.num_outputs), val,
                        {**pseudo, "labelled_rows": len(train.paths)})
    else:
        labels, task = task_for_datasets(config, user_sets["train"])
        train, val = user_sets["train"], user_sets["val"]
        if limits is not None:
            train, val = train.head(limits.train), val.head(limits.val)
    if task.kind == "ranking" and not isinstance(train, Records) and getattr(val, "groups", None) is None:
        raise ConfigError("task.kind=ranking: the validation dataset needs a `groups` attribute (each row's query)")
    return Data(task, labels, train, val)


def pseudo_line(pseudo: dict) -> str:
    return (f"pseudo-labels: {pseudo['added']} of the {pseudo['predicted_rows']} test rows of {pseudo['file']} reach "
            f"data.pseudo_threshold={pseudo['threshold']:g} and join the {pseudo['labelled_rows']} labelled training rows "
            f"with their probabilities as soft targets (never a validation row)")


def build_network(config: Config, task: Task, given: nn.Module | None = None) -> nn.Module:
    """The model with the task's output size (model.num_classes, when set, must agree with the data)."""
    num_outputs = config.model.num_classes or task.num_outputs
    if num_outputs != task.num_outputs:
        raise ConfigError(f"model.num_classes={num_outputs} but the data has {task.num_outputs} "
                          f"{'classes' if task.kind == 'classification' else f'outputs (task.kind={task.kind})'}")
    return build_model(config.model, num_outputs, config.data.channels, config.data.image_size, given=given)


def build_distillation(accelerator: Accelerator, config: Config, data: Data) -> Distillation:
    """The teacher's outputs of the training rows, on the device, from the run directory's cache (computed before the
    run by commands/distill.py: train.py does it), keyed by row id -- or the teacher itself (distill.live, as
    teacher.json describes it); and the loss that mixes them in."""
    if not data.built_in:
        raise ConfigError("distill.teacher keys the teacher's outputs by the built-in training table's row ids; "
                          "datasets of your own have none")
    sizes, weights = heads_of(data.task)
    describe = {"teacher": config.distill.teacher, "alpha": config.distill.alpha, "temperature": config.distill.temperature}
    if config.distill.live:  # the teacher on every batch, as the student sees it
        path = Path(config.output_dir) / TEACHER_SPEC
        if not path.is_file():
            raise ConfigError(f"distill.live: no {path}: train.py writes it before training")
        spec = json.loads(path.read_text())
        distill = Distillation(config.distill, sizes, weights, teacher=live_teacher(spec, config.data, accelerator.device),
                               binary=data.task.kind == "multilabel")
        distill.describe = {**describe, "outputs": "live", "fingerprint": spec["fingerprint"], "weights": spec["weights"]}
        return distill
    path = Path(config.output_dir) / TEACHER_CACHE
    distill = Distillation(config.distill, sizes, weights, cached=read_cache(path, data.train.ids, accelerator.device),
                           binary=data.task.kind == "multilabel")
    distill.describe = {**describe, "outputs": "cached", "cache": str(path),
                        "fingerprint": cache_metadata(path).get("fingerprint"), "rows": len(data.train.ids)}
    return distill


def refuse_deepspeed_batchnorm(accelerator: Accelerator, config: Config, model: nn.Module) -> None:
    if config.deepspeed.enabled and config.train.mixed_precision != "no" and accelerator.device.type == "cpu" and has_batchnorm(model):
        raise ConfigError(
            f"DeepSpeed with {config.train.mixed_precision} on CPU cannot run BatchNorm ({config.model.name}): DeepSpeed "
            f"casts the weights, and torch's CPU batch_norm refuses mixed dtypes. Use train.mixed_precision=no, or DDP "
            f"(deepspeed.enabled=false) whose autocast keeps BatchNorm in float32, or a model without BatchNorm"
        )


def build_datasets(accelerator: Accelerator, config: Config, data: Data) -> tuple[Dataset, Dataset, bool]:
    """The training and validation datasets, and whether their JPEGs are decoded on the device (data.decode)."""
    if not data.built_in:
        if config.tracking.images:
            main_print(accelerator, "tracking: the worst-mistakes grid shows the built-in dataset's image files; "
                                    "skipped for your datasets (the confusion matrix is still drawn)")
        return data.train, data.val, False
    on_device = decodes_on_device(config.data, accelerator.device, [data.train, data.val])
    return (build_dataset(data.train, config.data, "train", config.seed, on_device),
            build_dataset(data.val, config.data, "val", config.seed, on_device), on_device)


def build_guard(accelerator: Accelerator, config: Config, model: nn.Module, torch_optimizer) -> FiniteGuard:
    """train.nonfinite's guard over the optimizer steps (see guard.FiniteGuard)."""
    policy = config.train.nonfinite
    if policy == "skip" and config.deepspeed.enabled:
        policy = "stop"  # DeepSpeed steps inside backward: a bad step cannot be skipped, only refused
        main_print(accelerator, "train.nonfinite=skip acts as stop under DeepSpeed (its optimizer steps inside backward)")
    checkpoints = Path(config.output_dir) / "checkpoints"
    return FiniteGuard(accelerator, torch_optimizer, policy, config.train.max_bad_steps,
                       kept=lambda: f"the last checkpoint ({describe_last(checkpoints)}) holds finite weights",
                       via_gradients=isinstance(getattr(model, "_orig_mod", model), nn.parallel.DistributedDataParallel))


def input_dtype(model: nn.Module) -> torch.dtype:
    """float32 normally (autocast does mixed precision); bf16/fp16 when DeepSpeed keeps the weights in it."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


# ----------------------------------------------------------------------------------------------
# the batch size


def fit_batch_size(accelerator: Accelerator, config: Config, model: nn.Module) -> Config:
    """train.find_batch_size: the config with the largest data.batch_size (at most the configured one) that fits on
    every rank. DeepSpeed's plugin, built with the configured size, is told the new one."""
    if not config.train.find_batch_size:
        return config
    shape = (config.data.channels, config.data.image_size, config.data.image_size)
    found = largest_batch_that_fits(accelerator, model, config.data.batch_size, shape)
    if found == config.data.batch_size:
        return config
    main_print(accelerator, f"train.find_batch_size: data.batch_size {config.data.batch_size} does not fit on "
                            f"every rank; using {found} per process")
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        layout = Layout(accelerator.num_processes, found, config.train.grad_accum_steps)
        plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=found, train_batch_size=layout.global_batch)
    return replace(config, data=replace(config.data, batch_size=found))


def with_accumulation(accelerator: Accelerator, config: Config, accum: int) -> Config:
    """The config, and the Accelerator (and DeepSpeed's plugin), with `accum` micro-batches per optimizer step."""
    if accum == config.train.grad_accum_steps:
        return config
    accelerator.gradient_accumulation_steps = accum
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        layout = Layout(accelerator.num_processes, config.data.batch_size, accum)
        plugin.deepspeed_config.update(gradient_accumulation_steps=accum, train_batch_size=layout.global_batch)
    return replace(config, train=replace(config.train, grad_accum_steps=accum))


def check_deepspeed_batch(accelerator: Accelerator, model: nn.Module, config: Config) -> None:
    """DeepSpeed's engine must run with the micro-batch the loaders deliver (it keeps its own copy of the size)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    micro = model.train_micro_batch_size_per_gpu()
    if micro != config.data.batch_size:
        raise DistributedSetupError(f"DeepSpeed runs with train_micro_batch_size_per_gpu={micro}, the loaders with "
                                    f"data.batch_size={config.data.batch_size}")


def largest_batch_that_fits(accelerator: Accelerator, model: nn.Module, start: int, sample_shape: tuple) -> int:
    """Halve `start` until a forward + backward of a batch that size fits in this rank's memory; every rank
    returns the smallest size any rank found. The probe feeds zeros in eval mode: no RNG drawn, no
    BatchNorm statistics touched, the weights left as they were."""
    model.to(accelerator.device)
    was_training = model.training
    model.eval()
    size = start
    while True:
        try:
            faults.inject(f"find:{size}")
            with accelerator.autocast():
                out = model(torch.zeros(size, *sample_shape, device=accelerator.device))
            out.float().sum().backward()
            break
        except RuntimeError as exc:  # torch.OutOfMemoryError is one; so are cuDNN/cuBLAS allocation failures
            if size == 1 or not is_out_of_memory(exc):
                raise
            size //= 2
        finally:
            out = None
            model.zero_grad(set_to_none=True)
            if accelerator.device.type == "cuda":
                torch.cuda.empty_cache()
    model.train(was_training)
    agreed = torch.tensor([size], device=accelerator.device)
    if accelerator.num_processes > 1:  # the ranks agree on the smallest size any of them found
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
    return int(agreed.item())
