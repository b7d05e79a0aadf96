"""fit(): build every part from the config, run epochs of train + validate, keep best/last, stop early."""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import signal
import socket
import time
from pathlib import Path

import accelerate
import torch
import torchvision
import yaml
from accelerate.utils import gather_object, set_seed

from dist_train import checkpoint as ckpt
from dist_train.batchnorm import convert_sync_batchnorm
from dist_train.config import Config, to_dict
from dist_train.data import ImageDataset, build_loader, build_transform, load_records
from dist_train.distributed import broadcast_buffers, build_accelerator, main_print, same_on_all_ranks
from dist_train.engine import check_each_once, predict_gathered, train_one_epoch
from dist_train.errors import ConfigError
from dist_train.losses import build_loss
from dist_train.metrics import classification_metrics, is_improvement
from dist_train.models import build_model, has_batchnorm, parameter_counts
from dist_train.optim import Schedule, build_optimizer

CLASSES_FILE = "classes.json"
KILL_AFTER_EPOCH_ENV = "DIST_TRAIN_TEST_KILL_AFTER_EPOCH"


def fit(config: Config, resume: str | None = None, overwrite: bool = False) -> dict:
    """Train as configured; returns the run summary also written to run_info.json."""
    output_dir = Path(config.output_dir)
    checkpoints = output_dir / "checkpoints"
    if resume is None and not overwrite and (checkpoints / "last").exists():
        raise ConfigError(
            f"{output_dir} already holds a run; continue it with --resume auto, or pass --overwrite, "
            f"or choose another output_dir=..."
        )
    accelerator = build_accelerator(
        seed=config.seed,
        mixed_precision=config.train.mixed_precision,
        grad_accum_steps=config.train.grad_accum_steps,
        project_dir=str(output_dir),
        log_with="tensorboard",
        timeout_s=config.train.distributed_timeout_s,
        deepspeed=config.deepspeed,
        batch_size=config.data.batch_size,
        max_grad_norm=config.train.max_grad_norm,
    )
    try:
        return _fit(accelerator, config, output_dir, resume)
    finally:
        accelerator.end_training()


def _fit(accelerator, config: Config, output_dir: Path, resume: str | None) -> dict:
    started = time.time()
    # The same seed on every rank: identical initial weights before DDP even broadcasts them.
    set_seed(config.seed)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)

    # --- data ---------------------------------------------------------------------------------
    with accelerator.main_process_first():  # the digits are written once, by the main process
        train_records, val_records, classes = load_records(config.data, config.seed)
    num_classes = config.model.num_classes or len(classes)
    if num_classes != len(classes):
        raise ConfigError(f"model.num_classes={num_classes} but the data has {len(classes)} classes")
    train_set = ImageDataset(train_records, build_transform(config.data, train=True), config.data.channels)
    val_set = ImageDataset(val_records, build_transform(config.data, train=False), config.data.channels)
    train_loader = build_loader(train_set, config.data, train=True, seed=config.seed)
    val_loader = build_loader(val_set, config.data, train=False, seed=config.seed)

    # --- model, loss, optimizer -----------------------------------------------------------------
    model = build_model(config.model, num_classes, config.data.channels, config.data.image_size)
    if config.deepspeed.enabled and config.train.mixed_precision != "no" and accelerator.device.type == "cpu" and has_batchnorm(model):
        raise ConfigError(
            f"DeepSpeed with {config.train.mixed_precision} on CPU cannot run BatchNorm ({config.model.name}): DeepSpeed "
            f"casts the weights, and torch's CPU batch_norm refuses mixed dtypes. Use train.mixed_precision=no, or DDP "
            f"(deepspeed.enabled=false) whose autocast keeps BatchNorm in float32, or a model without BatchNorm"
        )
    if config.model.sync_batchnorm:
        model = convert_sync_batchnorm(model, on_gpu=accelerator.device.type == "cuda")
    trainable, frozen = parameter_counts(model)
    loss_fn = build_loss(config.loss, num_classes).to(accelerator.device)
    torch_optimizer = build_optimizer(config.optim, model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, torch_optimizer, train_loader, val_loader)

    accum = config.train.grad_accum_steps
    # Accelerate syncs at the end of the loader, so a last short window is one more optimizer step.
    steps_per_epoch = math.ceil(len(train_loader) / accum)
    total_steps = steps_per_epoch * config.train.epochs
    if config.train.max_steps is not None:
        total_steps = min(total_steps, config.train.max_steps)
    # On the torch optimizer itself: DeepSpeed's ZeRO wrappers are no torch Optimizer but share its param_groups.
    schedule = Schedule(config.scheduler, torch_optimizer, steps_per_epoch, total_steps, config.checkpoint.mode)
    state = ckpt.TrainerState()

    config_yaml = yaml.safe_dump(to_dict(config), sort_keys=False)
    checkpoints = output_dir / "checkpoints"
    if resume is not None:
        resume_dir = ckpt.resolve_resume(resume, output_dir)
        ckpt.load_checkpoint(accelerator, resume_dir, schedule, state)
        main_print(accelerator, f"resumed from {resume_dir} after epoch {state.epoch} (step {state.global_step})")

    # --- run directory --------------------------------------------------------------------------
    devices = gather_object([f"{socket.gethostname()}:{accelerator.device}"])
    run_info = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "accelerate": accelerate.__version__,
        },
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "devices": devices,
        "mixed_precision": config.train.mixed_precision,
        "zero_stage": accelerator.state.deepspeed_plugin.zero_stage if config.deepspeed.enabled else None,
        "per_process_batch": config.data.batch_size,
        "grad_accum_steps": accum,
        "global_batch": config.data.batch_size * accelerator.num_processes * accum,
        "batches_per_epoch_per_process": len(train_loader),
        "optimizer_steps_per_epoch": steps_per_epoch,
        "total_optimizer_steps": total_steps,
        "train_samples": len(train_set),
        "val_samples": len(val_set),
        "classes": classes,
        "parameters": {"trainable": trainable, "frozen": frozen},
    }
    if accelerator.is_main_process:
        checkpoints.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(config_yaml)
        _write_json(output_dir / "run_info.json", run_info)
        if resume is None:
            (output_dir / "metrics.jsonl").write_text("")
    accelerator.init_trackers("tensorboard")
    main_print(
        accelerator,
        f"dist_train: {accelerator.num_processes} process(es), {accelerator.distributed_type}, device {accelerator.device}; "
        f"global batch {run_info['global_batch']} = {config.data.batch_size} x {accelerator.num_processes} processes "
        f"x {accum} accumulation; {len(train_loader)} batches/epoch/process, {steps_per_epoch} optimizer steps/epoch; "
        f"{config.model.name}: {trainable:,} trainable, {frozen:,} frozen parameters",
    )

    monitor, mode = config.checkpoint.monitor, config.checkpoint.mode
    stopped_early = False
    for epoch in range(state.epoch, config.train.epochs):
        train_loader.set_epoch(epoch)
        result, state.global_step = train_one_epoch(
            accelerator, model, train_loader, loss_fn, optimizer, schedule,
            batch_size=config.data.batch_size,
            dataset_len=len(train_set),
            grad_accum_steps=accum,
            max_grad_norm=config.train.max_grad_norm,
            log_every_n_steps=config.train.log_every_n_steps,
            global_step=state.global_step,
            max_steps=config.train.max_steps,
            log=accelerator.log,
            epoch=epoch + 1,
        )
        lr = schedule.lr()
        broadcast_buffers(accelerator, model)
        out = predict_gathered(accelerator, model, val_loader, "validate", loss_fn)
        check_each_once(out["indices"], len(val_set), "validation")
        metrics = same_on_all_ranks(accelerator, classification_metrics(out["logits"], out["targets"], out["losses"]))
        schedule.step_metric(metrics[monitor])
        improved = is_improvement(metrics[monitor], state.best_metric, mode)
        state.epoch = epoch + 1
        if improved:
            state.best_metric, state.best_epoch, state.evals_without_improvement = metrics[monitor], state.epoch, 0
        else:
            state.evals_without_improvement += 1
        shards = gather_object([(accelerator.process_index, result.local_batches, result.local_samples)])
        record = {
            "epoch": state.epoch,
            "step": state.global_step,
            **{k: v for k, v in metrics.items() if k.startswith("val_")},
            "train_loss": result.train_loss,
            "lr": lr,
            "samples_per_sec": result.samples / max(result.seconds, 1e-9),
            "epoch_seconds": result.seconds,
            "rank_batches": [b for _, b, _ in sorted(shards)],
            "rank_samples": [s for _, _, s in sorted(shards)],
        }
        state.history.append({k: record[k] for k in ("epoch", "rank_batches", "rank_samples")})

        if config.checkpoint.save_last:
            ckpt.save_checkpoint(accelerator, model, checkpoints / "last", schedule, state, config_yaml)
            if improved:
                ckpt.copy_checkpoint(accelerator, checkpoints / "last", checkpoints / "best")
        elif improved:
            ckpt.save_checkpoint(accelerator, model, checkpoints / "best", schedule, state, config_yaml)
        if accelerator.is_main_process:
            for name in ("last", "best"):
                if (checkpoints / name).is_dir():
                    _write_json(checkpoints / name / CLASSES_FILE, classes)
            with open(output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if os.environ.get(KILL_AFTER_EPOCH_ENV) == str(state.epoch) and accelerator.is_main_process:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the resume tests: a crash, not an exit
        accelerator.log(
            {"train/epoch_loss": result.train_loss, "epoch": state.epoch,
             **{f"val/{k[4:]}": v for k, v in metrics.items() if k.startswith("val_")}},
            step=state.global_step,
        )
        main_print(
            accelerator,
            f"epoch {state.epoch}/{config.train.epochs}  train_loss {result.train_loss:.4f}  "
            f"val_loss {metrics['val_loss']:.4f}  val_accuracy {metrics['val_accuracy']:.4f}  "
            f"val_f1_macro {metrics['val_f1_macro']:.4f}  lr {lr:.2e}  {record['samples_per_sec']:.0f} samples/s"
            + ("  * best" if improved else ""),
        )
        if config.train.max_steps is not None and state.global_step >= config.train.max_steps:
            main_print(accelerator, f"reached train.max_steps={config.train.max_steps}")
            break
        patience = config.train.early_stopping_patience
        if patience and state.evals_without_improvement >= patience and state.epoch < config.train.epochs:
            main_print(accelerator, f"early stop: {monitor} did not improve for {patience} evaluations")
            stopped_early = True
            break

    digests = gather_object([weights_digest(ckpt.full_state_dict(accelerator, model))])
    summary = {
        **run_info,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_seconds": time.time() - started,
        "epochs_completed": state.epoch,
        "stopped_early": stopped_early,
        "best": {"metric": monitor, "value": state.best_metric, "epoch": state.best_epoch},
        "final_weights_sha256_per_rank": digests,
    }
    if accelerator.is_main_process:
        _write_json(output_dir / "run_info.json", summary)
    main_print(
        accelerator,
        f"best {monitor} {state.best_metric:.4f} at epoch {state.best_epoch}; "
        f"checkpoints in {checkpoints}, TensorBoard logs in {output_dir / 'tensorboard'}",
    )
    return summary


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor of a state dict, in name order: equal digests mean bitwise-equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)
