"""The explicit loop: train_one_epoch and evaluate. Everything else (what to build, when to save) lives elsewhere."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from dist_train.optim import Schedule


def progress(iterable, desc: str, accelerator: Accelerator) -> tqdm:
    """A bar on the main process only; redrawn rarely when the output is a log file, not a terminal."""
    return tqdm(
        iterable, desc=desc, disable=not accelerator.is_main_process, leave=False, dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )


@dataclass
class EpochResult:
    train_loss: float
    """Mean over this epoch's micro-batches of all processes."""
    optimizer_steps: int
    samples: int
    """Samples seen by all processes together (padding repeats included)."""
    local_samples: int
    """Samples seen by this process."""
    local_batches: int
    seconds: float


def train_one_epoch(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    *,
    max_grad_norm: float | None,
    log_every_n_steps: int,
    global_step: int,
    log,
    epoch: int,
) -> tuple[EpochResult, int]:
    """One pass over this process's shard; returns the result and the new optimizer-step count."""
    model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    local_samples = local_batches = steps = 0
    window_start = time.perf_counter()
    window_samples = 0
    bar = progress(loader, f"epoch {epoch}", accelerator)
    for images, targets, _ in bar:
        # accumulate() turns off DDP's gradient all-reduce on all but the last micro-batch of each
        # window (and always syncs at the end of the loader, so no gradient leaks into the next epoch).
        with accelerator.accumulate(model):
            logits = model(images)
            loss = loss_fn(logits, targets).mean()
            accelerator.backward(loss)  # divides by grad_accum_steps
            grad_norm = None
            if accelerator.sync_gradients and max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()  # a no-op inside an accumulation window
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().double()
        local_batches += 1
        local_samples += len(targets)
        window_samples += len(targets)
        if accelerator.sync_gradients:
            steps += 1
            global_step += 1
            if not accelerator.optimizer_step_was_skipped:
                schedule.step()
            if global_step % log_every_n_steps == 0:
                now = time.perf_counter()
                values = {"train/loss": accelerator.reduce(loss.detach().float(), "mean").item(), "train/lr": schedule.lr()}
                values["train/samples_per_sec"] = window_samples * accelerator.num_processes / max(now - window_start, 1e-9)
                if grad_norm is not None:
                    values["train/grad_norm"] = float(grad_norm)
                log(values, global_step)
                window_start, window_samples = now, 0
                bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values['train/lr']:.2e}")
    bar.close()
    totals = accelerator.reduce(
        torch.tensor([loss_sum.item(), local_batches, local_samples], dtype=torch.float64, device=accelerator.device), "sum"
    )
    result = EpochResult(
        train_loss=(totals[0] / max(totals[1], 1)).item(),
        optimizer_steps=steps,
        samples=int(totals[2].item()),
        local_samples=local_samples,
        local_batches=local_batches,
        seconds=time.perf_counter() - start,
    )
    return result, global_step


@torch.inference_mode()
def predict_gathered(accelerator: Accelerator, model: torch.nn.Module, loader, desc: str, loss_fn=None):
    """Logits, targets, dataset indices (and per-sample losses) of the whole split, gathered on every rank.

    `gather_for_metrics` drops the repeats that pad the last batches, so each sample appears exactly once;
    the returned indices let callers check that and restore the input order.
    """
    model.eval()
    outputs = {"logits": [], "targets": [], "indices": [], "losses": []}
    for images, targets, indices in progress(loader, desc, accelerator):
        with accelerator.autocast():
            logits = model(images)
        batch = {"logits": logits.float(), "targets": targets, "indices": indices}
        if loss_fn is not None:
            batch["losses"] = loss_fn(logits, targets)
        for key, value in accelerator.gather_for_metrics(batch).items():
            outputs[key].append(value.cpu())
    return {k: torch.cat(v) if v else torch.empty(0) for k, v in outputs.items()}


def check_each_once(indices: torch.Tensor, expected: int, what: str) -> None:
    """The gathered indices must be a permutation of range(expected): no sample lost or counted twice."""
    if len(indices) != expected or not torch.equal(torch.sort(indices).values, torch.arange(expected)):
        raise RuntimeError(f"{what}: gathered {len(indices)} predictions for {expected} samples (lost or duplicated rows)")
