"""fit(): build every part from the config, run epochs of train + validate, keep best/last, stop early."""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path

import accelerate
import torch
import torchvision
import yaml
from accelerate.utils import gather_object, set_seed
from torch.utils.data import default_collate

from dist_train import checkpoint as ckpt
from dist_train import debug as debug_module
from dist_train import faults
from dist_train.batchnorm import convert_sync_batchnorm
from dist_train.config import Config, preprocessing, preprocessing_summary, resolve, to_dict
from dist_train.custom import user_datasets
from dist_train.data import ModelInput, build_dataset, build_loader, decodes_on_device
from dist_train.debug import head
from dist_train.decode import collate_encoded
from dist_train.distributed import broadcast_buffers, build_accelerator, is_main_process_env, main_print, same_on_all_ranks
from dist_train.engine import (EpochTotals, FiniteGuard, check_each_once, input_dtype, largest_batch_that_fits,
                               predict_gathered, train_one_epoch)
from dist_train.ema import ModelEMA
from dist_train.errors import ConfigError, ResourceError
from dist_train.faults import Preempted, SignalFlag, Watchdog, any_rank
from dist_train.losses import build_loss
from dist_train.metrics import is_improvement
from dist_train.mixing import mix_batch
from dist_train.models import build_model, has_batchnorm, parameter_counts
from dist_train.optim import Schedule, build_optimizer
from dist_train.tasks import group_ids, load_task, task_for_datasets
from dist_train.tracking import Tracking, flat_hparams


def fit(config: Config, resume: str | None = None, overwrite: bool = False, debug: bool = False, *,
        model: torch.nn.Module | None = None, loss: torch.nn.Module | None = None, train_dataset=None,
        val_dataset=None) -> dict:
    """Train as configured; returns the run summary also written to run_info.json.

    debug=True (train.py --debug): print a summary of the real run, check that the model can overfit one
    batch, then train and validate on a few batches only. model / loss / train_dataset / val_dataset
    (dist_train.Trainer) take the place of what the config builds (custom.py says what they must be).
    """
    config = resolve(config)  # (a Config built in Python: validated, monitor/mode filled in)
    output_dir = Path(config.output_dir)
    checkpoints = output_dir / "checkpoints"
    if resume is None and not overwrite and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
        resume = "auto"  # a SLURM job requeued after preemption runs the same command again: it continues
        if is_main_process_env():
            print(f"SLURM_RESTART_COUNT={os.environ['SLURM_RESTART_COUNT']}: continuing with --resume auto", flush=True)
    if resume is None and not overwrite and ckpt.complete_checkpoints(checkpoints):
        raise ConfigError(
            f"{output_dir} already holds a run; continue it with --resume auto, or pass --overwrite, "
            f"or choose another output_dir=..."
        )
    accelerator = build_accelerator(
        seed=config.seed,
        mixed_precision=config.train.mixed_precision,
        grad_accum_steps=config.train.grad_accum_steps,
        project_dir=str(output_dir),
        timeout_s=config.train.distributed_timeout_s,
        compile=config.train.compile,
        deepspeed=config.deepspeed,
        batch_size=config.data.batch_size,
        max_grad_norm=config.train.max_grad_norm,
    )
    # From here on a rank that stops making progress ends the job, naming itself (faults.Watchdog),
    # through the teardown too: a process group destroyed while a peer still uses it can hang.
    watchdog = Watchdog(config.train.distributed_timeout_s, accelerator.num_processes)
    signals = SignalFlag()
    try:
        if accelerator.is_main_process:
            if resume is None:  # --overwrite (or a directory without complete checkpoints): start clean
                shutil.rmtree(checkpoints, ignore_errors=True)
                shutil.rmtree(output_dir / "tensorboard", ignore_errors=True)
            for name in ckpt.clean_stale(checkpoints):
                print(f"removed {checkpoints / name}, left by a job that died while saving", flush=True)
        accelerator.wait_for_everyone()
        given = {"model": model, "loss": loss, "train": train_dataset, "val": val_dataset}
        summary = _fit(accelerator, config, output_dir, resume, watchdog, signals, debug, given)
        accelerator.wait_for_everyone()  # no rank tears the process group down while another still uses it
        return summary
    except BaseException as exc:
        if not isinstance(exc, Preempted):  # preempted: the requeue still has to outlive the launcher's SIGTERM
            signals.restore()
        if not isinstance(exc, torch.OutOfMemoryError):
            raise
        raise ResourceError(
            f"out of memory on {accelerator.device} with data.batch_size={config.data.batch_size} per process "
            f"(global batch {config.data.batch_size * accelerator.num_processes * config.train.grad_accum_steps}): "
            f"{str(exc).splitlines()[0]}. Lower data.batch_size (and raise train.grad_accum_steps to keep the global "
            f"batch), use train.mixed_precision=bf16, or let train.find_batch_size=true pick a size") from None
    finally:
        watchdog.beat()
        accelerator.end_training()
        watchdog.stop()


def _fit(accelerator, config: Config, output_dir: Path, resume: str | None, watchdog: Watchdog, signals: SignalFlag,
         debug: bool = False, given: dict | None = None) -> dict:
    started = time.time()
    # The same seed on every rank: identical initial weights before DDP even broadcasts them.
    set_seed(config.seed)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)

    # --- data, model, loss, optimizer -------------------------------------------------------------
    given = given or {}
    with accelerator.main_process_first():  # the digits (or the user's data) are written once, by the main process
        user_sets = user_datasets(config.data, {"train": given.get("train"), "val": given.get("val")})
        if user_sets is None:
            train_records, val_records, labels, task = load_task(config)
        else:
            labels, task = task_for_datasets(config, user_sets["train"])
    num_outputs = config.model.num_classes or task.num_outputs
    if num_outputs != task.num_outputs:
        raise ConfigError(f"model.num_classes={num_outputs} but the data has {task.num_outputs} "
                          f"{'classes' if task.kind == 'classification' else f'outputs (task.kind={task.kind})'}")
    model = build_model(config.model, num_outputs, config.data.channels, config.data.image_size, given=given.get("model"))
    model_name = config.model.name if given.get("model") is None and config.model.file is None else type(model).__name__
    if debug:
        train_count = debug_module.TRAIN_BATCHES * config.data.batch_size * config.train.grad_accum_steps
        val_count = debug_module.EVAL_BATCHES * debug_module.eval_batch(config)
        if user_sets is None:
            train_records, val_records = head(train_records, train_count), head(val_records, val_count)
        else:
            user_sets = {"train": user_sets["train"].head(train_count), "val": user_sets["val"].head(val_count)}
    if config.deepspeed.enabled and config.train.mixed_precision != "no" and accelerator.device.type == "cpu" and has_batchnorm(model):
        raise ConfigError(
            f"DeepSpeed with {config.train.mixed_precision} on CPU cannot run BatchNorm ({config.model.name}): DeepSpeed "
            f"casts the weights, and torch's CPU batch_norm refuses mixed dtypes. Use train.mixed_precision=no, or DDP "
            f"(deepspeed.enabled=false) whose autocast keeps BatchNorm in float32, or a model without BatchNorm"
        )
    if config.train.find_batch_size:
        shape = (config.data.channels, config.data.image_size, config.data.image_size)
        found = largest_batch_that_fits(accelerator, model, config.data.batch_size, shape)
        if found != config.data.batch_size:
            main_print(accelerator, f"train.find_batch_size: data.batch_size {config.data.batch_size} does not fit on "
                                    f"every rank; using {found} per process")
            config = replace(config, data=replace(config.data, batch_size=found))
    if config.model.sync_batchnorm:
        model = convert_sync_batchnorm(model, on_gpu=accelerator.device.type == "cuda")
    if user_sets is None:
        on_device = decodes_on_device(config.data, accelerator.device, [train_records, val_records])
        train_set = build_dataset(train_records, config.data, "train", config.seed, on_device)
        val_set = build_dataset(val_records, config.data, "val", config.seed, on_device)
    else:
        on_device, train_set, val_set = False, user_sets["train"], user_sets["val"]
        if config.tracking.images:
            main_print(accelerator, "tracking: the worst-mistakes grid shows the built-in dataset's image files; "
                                    "skipped for your datasets (the confusion matrix is still drawn)")
    channels_last = config.train.channels_last if config.train.channels_last is not None else accelerator.device.type == "cuda"
    train_loader = build_loader(train_set, config.data, train=True, seed=config.seed)
    val_loader = build_loader(val_set, config.data, train=False, seed=config.seed)
    trainable, frozen = parameter_counts(model)
    loss_fn = (build_loss(config.loss, num_outputs, given=given["loss"]) if given.get("loss") is not None
               else task.loss()).to(accelerator.device)
    if debug:
        batch = [train_set[i] for i in range(min(config.data.batch_size, len(train_set)))]
        if on_device:
            images, targets = ModelInput(config.data, accelerator.device, True, torch.float32, False)(*collate_encoded(batch)[:2])
        else:
            images, targets = torch.stack([b[0] for b in batch]), default_collate([b[1] for b in batch])
        first, last = debug_module.overfit_one_batch(config, model, loss_fn, images, targets, accelerator.device)
        print(f"debug: overfit one batch ({len(targets)} images, {debug_module.OVERFIT_STEPS} steps of {config.optim.name} "
              f"at lr {config.optim.lr:g}): loss {first:.4f} -> {last:.4f}, ok", flush=True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    torch_optimizer = build_optimizer(config.optim, model, fused=not config.deepspeed.enabled)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, torch_optimizer, train_loader, val_loader)
    prepare_input = ModelInput(config.data, accelerator.device, on_device, input_dtype(model), channels_last)
    ema = None
    if config.train.ema_decay is not None:
        if config.deepspeed.enabled and config.deepspeed.zero_stage == 3:
            raise ConfigError("train.ema_decay needs whole parameters on every rank; DeepSpeed ZeRO-3 partitions them "
                              "(use zero_stage 1 or 2, or DDP)")
        ema = ModelEMA(accelerator.unwrap_model(model), config.train.ema_decay, config.train.ema_warmup)
    mix = None
    if config.data.mixup_alpha > 0 or config.data.cutmix_alpha > 0:
        def mix_micro_batch(images, targets, epoch: int, micro: int):
            """Mixup/CutMix of one micro-batch; its randomness is a function of (seed, epoch, batch, rank) only."""
            seed = ((config.seed * 1_000_003 + epoch) * 1_000_033 + micro) * 1_009 + accelerator.process_index
            return mix_batch(images, targets, task.num_outputs, mixup_alpha=config.data.mixup_alpha,
                             cutmix_alpha=config.data.cutmix_alpha, prob=config.data.mix_prob,
                             switch_prob=config.data.mix_switch_prob, generator=torch.Generator().manual_seed(seed))
        mix = mix_micro_batch
    nonfinite = config.train.nonfinite
    if nonfinite == "skip" and config.deepspeed.enabled:
        nonfinite = "stop"  # DeepSpeed steps inside backward: a bad step cannot be skipped, only refused
        main_print(accelerator, "train.nonfinite=skip acts as stop under DeepSpeed (its optimizer steps inside backward)")

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
    layout = [accelerator.num_processes, config.data.batch_size, accum]
    state.layout = layout
    if resume is not None:
        resume_dir = ckpt.resolve_resume_on_main(accelerator, resume, checkpoints)
        ckpt.load_checkpoint(accelerator, resume_dir, schedule, state, layout, log=lambda m: main_print(accelerator, m))
        state.layout = layout
        if ema is not None:
            ckpt.load_ema(resume_dir, ema)
        if accelerator.is_main_process:
            ckpt.repair_after_resume(output_dir, state)
        main_print(accelerator, f"resumed from {resume_dir}: epoch {state.epoch + 1}, batch {state.batches_done}, "
                                f"step {state.global_step}")

    guard = None
    if nonfinite != "ignore":
        guard = FiniteGuard(accelerator, torch_optimizer, nonfinite, config.train.max_bad_steps,
                            kept=lambda: f"the last checkpoint ({ckpt._describe_last(checkpoints)}) holds finite weights",
                            skipped=state.skipped_steps, in_a_row=state.bad_steps_in_a_row,
                            via_gradients=isinstance(getattr(model, "_orig_mod", model), torch.nn.parallel.DistributedDataParallel))

    # --- run directory --------------------------------------------------------------------------
    processes = gather_object([{"rank": accelerator.process_index, "machine_rank": int(os.environ.get("GROUP_RANK", 0)),
                                "local_rank": accelerator.local_process_index, "host": socket.gethostname(),
                                "device": str(accelerator.device)}])
    devices = [f"{p['host']}:{p['device']}" for p in processes]
    run_info = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "accelerate": accelerate.__version__,
        },
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "devices": devices,
        "processes": processes,
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
        "task": task.kind,
        "classes": labels,
        "parameters": {"trainable": trainable, "frozen": frozen},
        "preprocessing": preprocessing(config.data),
        "resumed_from": str(resume_dir) if resume is not None else None,
    }
    if accelerator.is_main_process:
        checkpoints.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(config_yaml)
        _write_json(output_dir / "run_info.json", run_info)
        if resume is None:
            (output_dir / "metrics.jsonl").write_text("")
    tracking = Tracking(accelerator, config.tracking, output_dir, flat_hparams(to_dict(config)),
                        resumed_at=state.global_step if resume is not None else None)
    main_print(
        accelerator,
        f"dist_train: {accelerator.num_processes} process(es), {accelerator.distributed_type}, device {accelerator.device}; "
        f"global batch {run_info['global_batch']} = {config.data.batch_size} x {accelerator.num_processes} processes "
        f"x {accum} accumulation; {len(train_loader)} batches/epoch/process, {steps_per_epoch} optimizer steps/epoch; "
        f"{model_name}: {trainable:,} trainable, {frozen:,} frozen parameters; {preprocessing_summary(config.data)}",
    )

    def poll_guard(step: int) -> None:
        """Reads the non-finite-step counters (may stop the run) into the state a checkpoint keeps."""
        if guard is not None:
            guard.poll(step)
            state.skipped_steps, state.bad_steps_in_a_row = guard.skipped, guard.in_a_row

    def save(best: bool = False) -> Path:
        poll_guard(state.global_step)
        watchdog.beat()
        path = ckpt.save_checkpoint(accelerator, model, checkpoints, schedule, state, config_yaml, labels,
                                    best=best, keep_last=config.checkpoint.keep_last, ema=ema)
        watchdog.beat()
        return path

    last_save = time.monotonic()

    def on_step(batches_done: int, global_step: int) -> bool:
        """After each optimizer step: non-finite steps, periodic saves, preemption, max_steps. True ends the epoch."""
        nonlocal last_save
        state.global_step, state.batches_done = global_step, batches_done
        if ema is not None:
            ema.update(accelerator.unwrap_model(model))
        reached_max = config.train.max_steps is not None and global_step >= config.train.max_steps
        mid_epoch = batches_done < len(train_loader) and not reached_max  # else the epoch-end save follows
        due = config.checkpoint.every_n_steps is not None and global_step % config.checkpoint.every_n_steps == 0
        preempted = False
        if global_step % config.checkpoint.check_every_n_steps == 0:
            poll_guard(global_step)
            minutes = config.checkpoint.every_n_minutes
            timed = accelerator.is_main_process and minutes is not None and time.monotonic() - last_save >= 60 * minutes
            preempted, timed = any_rank(accelerator, signals.received is not None, timed)
            due = due or timed
        if preempted or (due and mid_epoch):
            state.epoch_totals = totals.reduced(accelerator)
            path = save()
            last_save = time.monotonic()
            if preempted:
                raise Preempted(f"a preemption signal reached the job; saved {path} at step {global_step}")
        faults.inject(f"step:{global_step}")
        return reached_max

    monitor, mode = config.checkpoint.monitor, config.checkpoint.mode
    val_groups = group_ids(val_records.groups if user_sets is None else getattr(val_set, "groups", None))
    if task.kind == "ranking" and val_groups is None:
        raise ConfigError("task.kind=ranking: the validation dataset needs a `groups` attribute (each row's query)")
    stopped_early = False
    for epoch in range(state.epoch, config.train.epochs):
        if config.train.max_steps is not None and state.global_step >= config.train.max_steps:
            break
        train_loader.set_epoch(epoch)
        train_set.set_epoch(epoch)
        start_batch, state.batches_done = state.batches_done, 0
        carried = state.epoch_totals if start_batch and accelerator.is_main_process else None
        totals, state.epoch_totals = EpochTotals(accelerator.device, carried), []
        loader = accelerator.skip_first_batches(train_loader, start_batch) if start_batch else train_loader
        if start_batch:
            loader.set_epoch(epoch)
        result, state.global_step = train_one_epoch(
            accelerator, model, loader, loss_fn, optimizer, schedule,
            batch_size=config.data.batch_size,
            dataset_len=len(train_set),
            grad_accum_steps=accum,
            max_grad_norm=config.train.max_grad_norm,
            log_every_n_steps=config.train.log_every_n_steps,
            global_step=state.global_step,
            log=tracking.scalars,
            epoch=epoch + 1,
            num_batches=len(train_loader),
            start_batch=start_batch,
            on_step=on_step,
            totals=totals,
            guard=guard,
            skip_bad_samples=config.data.bad_samples == "skip",
            prepare_input=prepare_input,
            beat=watchdog.beat,
            mix=mix,
        )
        poll_guard(state.global_step)
        lr = schedule.lr()
        broadcast_buffers(accelerator, model)
        if ema is not None and accelerator.num_processes > 1:  # the average's BatchNorm statistics: rank 0's, as the model's
            for buffer in ema.module.buffers():
                torch.distributed.broadcast(buffer.data, src=0)
        out = predict_gathered(accelerator, ema.module if ema is not None else model, val_loader, "validate", loss_fn,
                               beat=watchdog.beat, prepare_input=prepare_input)
        check_each_once(out["indices"], len(val_set), "validation")
        groups = val_groups[out["indices"]] if val_groups is not None else None
        metrics = same_on_all_ranks(accelerator, task.metrics(out["logits"], out["targets"], out["losses"], groups))
        schedule.step_metric(metrics[monitor])
        improved = is_improvement(metrics[monitor], state.best_metric, mode)
        state.epoch, state.batches_done = epoch + 1, 0
        state.skipped_samples += result.skipped_samples
        if improved:
            state.best_metric, state.best_epoch, state.evals_without_improvement = metrics[monitor], state.epoch, 0
            state.best_checkpoint = ckpt.checkpoint_name(state.global_step)
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
            "data_wait_fraction": result.data_seconds / max(result.seconds, 1e-9),
            "skipped_steps": state.skipped_steps,
            "skipped_samples": result.skipped_samples,
            "rank_batches": [b for _, b, _ in sorted(shards)],
            "rank_samples": [s for _, _, s in sorted(shards)],
        }
        state.history.append({k: record[k] for k in ("epoch", "rank_batches", "rank_samples")})
        # Logged before the save: a run killed in between replays this epoch, and the resume drops
        # what lies past its checkpoint (metrics.jsonl lines, TensorBoard's purge_step).
        if accelerator.is_main_process:
            with open(output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        tracking.scalars(
            {"train/epoch_loss": result.train_loss, "epoch": state.epoch,
             **{f"val/{k[4:]}": v for k, v in metrics.items() if k.startswith("val_")},
             **({"data/skipped_samples": result.skipped_samples} if config.data.bad_samples == "skip" else {})},
            step=state.global_step,
        )
        if task.kind == "classification":
            tracking.evaluation(state.global_step, metrics, labels, val_set, out)
        if result.skipped_samples:
            main_print(accelerator, f"epoch {state.epoch}: skipped {result.skipped_samples} unreadable training images "
                                    f"(data.bad_samples=skip; {state.skipped_samples} in all)")
        path = save(best=improved)
        last_save = time.monotonic()
        faults.inject(f"epoch:{state.epoch}")
        (preempted,) = any_rank(accelerator, signals.received is not None)  # e.g. a signal during validation
        if preempted:
            raise Preempted(f"a preemption signal reached the job; saved {path} at step {state.global_step}")
        main_print(
            accelerator,
            f"epoch {state.epoch}/{config.train.epochs}  train_loss {result.train_loss:.4f}  "
            + "".join(f"{k} {metrics[k]:.4f}  " for k in task.headline())
            + f"lr {lr:.2e}  {record['samples_per_sec']:.0f} samples/s"
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

    if state.best_metric is not None:
        last = read_last_metrics(output_dir) if accelerator.is_main_process else {}
        tracking.finish({f"best_{monitor}": state.best_metric, **{k: v for k, v in last.items()
                                                                   if k.startswith("val_") and isinstance(v, float)}},
                        state.global_step)
    digests = gather_object([ckpt.state_digest(ckpt.full_state_dict(accelerator, model))])
    # (DeepSpeed's ZeRO optimizers keep their state partitioned, outside the torch optimizer)
    optimizer_digests = gather_object([None if config.deepspeed.enabled else ckpt.state_digest(torch_optimizer.state_dict())])
    summary = {
        **run_info,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_seconds": time.time() - started,
        "epochs_completed": state.epoch,
        "global_step": state.global_step,
        "stopped_early": stopped_early,
        "best": {"metric": monitor, "value": state.best_metric, "epoch": state.best_epoch, "checkpoint": state.best_checkpoint},
        "skipped_steps": state.skipped_steps,
        "skipped_samples": state.skipped_samples,
        "final_weights_sha256_per_rank": digests,
        "final_optimizer_sha256_per_rank": optimizer_digests,
    }
    if accelerator.is_main_process:
        _write_json(output_dir / "run_info.json", summary)
    if state.best_metric is not None:
        main_print(accelerator, f"best {monitor} {state.best_metric:.4f} at epoch {state.best_epoch}; "
                                f"checkpoints in {checkpoints}, TensorBoard logs in {output_dir / 'tensorboard'}")
    return summary


def read_last_metrics(output_dir: Path) -> dict:
    lines = [line for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else {}


def _write_json(path: Path, value) -> None:
    ckpt.write_text_atomic(path, json.dumps(value, indent=1))
