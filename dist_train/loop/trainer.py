"""fit(): from a config to a finished run -- the accelerator, the run directory (locked: one run at a time), the
checkpoint to resume (on another number of processes too), the parts (build.py), the loop (engine.Run) -- with the
job's faults handled: preemption, hangs, out-of-memory, a requeued SLURM job."""
from __future__ import annotations

import gc
import os
import shutil
import time
from pathlib import Path

import torch

from dist_train.config import Config, resolve
from dist_train.errors import ConfigError, ResourceError, is_out_of_memory
from dist_train.job.distributed import build_accelerator, is_main_process_env, main_print, same_on_all_ranks
from dist_train.job.faults import Preempted, SignalFlag, Watchdog, is_peer_failure
from dist_train.job.layout import Layout
from dist_train.loop.build import Given, Limits, build_parts
from dist_train.loop.elastic import Saved
from dist_train.loop.engine import Run
from dist_train.rundir import checkpoint as ckpt
from dist_train.rundir.runlock import RunLock


def fit(config: Config, resume: str | None = None, overwrite: bool = False, *, model: torch.nn.Module | None = None,
        loss: torch.nn.Module | None = None, train_dataset=None, val_dataset=None, limits: Limits | None = None,
        judge=None) -> dict:
    """Train as configured; returns the run summary also written to run_info.json.

    `resume`: "auto" (the newest intact checkpoint of output_dir; with none yet, from the beginning) or a checkpoint
    directory; `overwrite`: start afresh in a directory that holds a run. model / loss / train_dataset / val_dataset
    (dist_train.Trainer) take the place of what the config builds (custom.py says what they must be); `limits`
    (train.py --debug) trains and validates on the first few samples only; `judge(epoch, metrics)`, asked on the main
    process after each evaluation, ends the run there when it returns True (a search's pruner: engine.Run).
    """
    config = resolve(config)  # (a Config built in Python: validated, monitor/mode filled in)
    output_dir = Path(config.output_dir)
    if config.train.deterministic:  # cuBLAS reads it at its first call; without it deterministic CUDA matmuls refuse
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
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
    lock = RunLock(output_dir)
    watchdog.before_exit.append(lock.release)  # a hung job ends from the watchdog's thread: the lock goes with it
    try:
        take_lock(accelerator, lock)  # before anything in the directory is touched
        resume = resume_argument(output_dir, resume, overwrite)
        started = time.time()
        # chosen before anything is tidied away: a directory whose checkpoints all fail to verify stays as it is
        checkpoint = ckpt.choose_checkpoint(accelerator, resume, output_dir / "checkpoints") if resume else None
        if accelerator.is_main_process:
            tidy_run_directory(output_dir, fresh=checkpoint is None)
        accelerator.wait_for_everyone()
        parts = build_parts(accelerator, config, Given(model, loss, train_dataset, val_dataset), limits,
                            resuming=Saved.read(checkpoint) if checkpoint is not None else None)
        run = Run(accelerator, parts, watchdog, signals, started, judge=judge)
        run.start(checkpoint)
        summary = run.train()
        accelerator.wait_for_everyone()  # no rank tears the process group down while another still uses it
        return summary
    except BaseException as exc:
        # preempted: the requeue still has to outlive the launcher's SIGTERM; a lost peer: this rank must live to name
        # it while the launcher stops the job (faults.report_failure); anything else ends at a SIGTERM again
        if not isinstance(exc, Preempted) and not is_peer_failure(exc):
            signals.restore()
        if not is_out_of_memory(exc):
            raise
        layout = Layout(accelerator.num_processes, config.data.batch_size, config.train.grad_accum_steps)
        raise ResourceError(
            f"out of memory on {accelerator.device} with data.batch_size={layout.batch_size} per process "
            f"(global batch {layout.global_batch}): {str(exc).splitlines()[0]}. Lower data.batch_size (and raise "
            f"train.grad_accum_steps to keep the global batch), use train.mixed_precision=bf16, or let "
            f"train.find_batch_size=true pick a size") from None
    finally:
        lock.release()
        watchdog.beat()
        # The DDP model (its reducer holds the process group) goes before the group: on torch 2.11 a reducer that
        # drops gloo's last reference destroys it holding the GIL while gloo's thread waits for it (a hang at exit).
        parts = run = None
        accelerator.free_memory()
        gc.collect()
        accelerator.end_training()
        watchdog.stop()


def take_lock(accelerator, lock: RunLock) -> None:
    """The main process takes the run directory's lock; every rank learns whether it did (and stops if not)."""
    outcome = None
    if accelerator.is_main_process:
        try:
            outcome = ("ok", lock.acquire())
        except ConfigError as exc:
            outcome = ("error", str(exc))
    kind, text = same_on_all_ranks(accelerator, outcome)
    if kind == "error":
        raise ConfigError(text)
    if text:
        main_print(accelerator, text)


def resume_argument(output_dir: Path, resume: str | None, overwrite: bool) -> str | None:
    """What to resume from: as asked; "auto" in a SLURM job requeued after preemption (it runs the same command
    again and must continue, or start, when it died before its first checkpoint: choose_checkpoint); an existing
    run without --resume or --overwrite is refused."""
    if resume is None and not overwrite and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
        resume = "auto"
        if is_main_process_env():
            print(f"SLURM_RESTART_COUNT={os.environ['SLURM_RESTART_COUNT']}: continuing with --resume auto", flush=True)
    if resume is None and not overwrite and ckpt.complete_checkpoints(output_dir / "checkpoints"):
        raise ConfigError(
            f"{output_dir} already holds a run; continue it with --resume auto, or pass --overwrite, "
            f"or choose another output_dir=..."
        )
    return resume


def tidy_run_directory(output_dir: Path, fresh: bool) -> None:
    """The main process, before the run, once the checkpoint to resume is chosen: a fresh run (--overwrite, or no
    complete checkpoint) starts clean; what a job that died while saving left behind goes."""
    checkpoints = output_dir / "checkpoints"
    if fresh:
        shutil.rmtree(checkpoints, ignore_errors=True)
        shutil.rmtree(output_dir / "tensorboard", ignore_errors=True)
    for name in ckpt.clean_stale(checkpoints):
        print(f"removed {checkpoints / name}, left by a job that died while saving", flush=True)
