"""The explicit loop: train_one_epoch and evaluate. Everything else (what to build, when to save) lives elsewhere."""
from __future__ import annotations

import math
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
    """Mean over this epoch's real samples of all processes (padding repeats excluded)."""
    optimizer_steps: int
    samples: int
    """Real samples trained on by all processes together."""
    local_samples: int
    """Samples seen by this process."""
    local_batches: int
    seconds: float


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """float32 normally (autocast does mixed precision); bf16/fp16 when DeepSpeed keeps the weights in it."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def real_sample_mask(micro_batch: int, batch_len: int, rank: int, world: int, batch_size: int, dataset_len: int) -> torch.Tensor:
    """Which rows of this rank's micro-batch are real samples rather than repeats that pad the epoch's end.

    Accelerate deals the sampler's batches out round-robin (batch k to rank k % world) and completes the
    last ones with indices from the epoch's start, so row j of micro-batch m on rank r sits at position
    m*world*b + r*b + j of the epoch's sample order, and is real iff that position is < len(dataset).
    (tests/test_sharding.py pins this layout against Accelerate's BatchSamplerShard.)
    """
    start = micro_batch * world * batch_size + rank * batch_size
    return (start + torch.arange(batch_len)) < dataset_len


def window_sample_count(first: int, end: int, world: int, batch_size: int, dataset_len: int) -> int:
    """Real samples, over all ranks, in micro-batches [first, end) of the epoch: one optimizer step's batch."""
    return min(dataset_len, end * world * batch_size) - min(dataset_len, first * world * batch_size)


def expected_batches_per_rank(dataset_len: int, batch_size: int, world: int) -> int:
    return math.ceil(math.ceil(dataset_len / batch_size) / world)


def train_one_epoch(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    *,
    batch_size: int,
    dataset_len: int,
    grad_accum_steps: int,
    max_grad_norm: float | None,
    log_every_n_steps: int,
    global_step: int,
    max_steps: int | None,
    log,
    epoch: int,
) -> tuple[EpochResult, int]:
    """One pass over this process's shard; returns the result and the new optimizer-step count.

    Each optimizer step follows the gradient of the mean loss over the real samples of its window, all
    ranks together: padding repeats weigh 0 and a short last window is normalised by its own size, so
    N processes x batch b x accumulation A take the same steps as 1 process with batch N*b*A.
    """
    model.train()
    start = time.perf_counter()
    world, rank, accum = accelerator.num_processes, accelerator.process_index, grad_accum_steps
    num_batches = len(loader)
    if num_batches != expected_batches_per_rank(dataset_len, batch_size, world):
        raise RuntimeError(f"the loader has {num_batches} batches per process; the sharding layout this loop relies on "
                           f"gives {expected_batches_per_rank(dataset_len, batch_size, world)}")
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    real_local = local_samples = local_batches = steps = 0
    window_start = time.perf_counter()
    window_samples = 0
    # the loss of one optimizer step: summed over its micro-batches until it is logged
    step_loss = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    dtype = input_dtype(model)
    bar = progress(loader, f"epoch {epoch}", accelerator)
    for micro, (images, targets, _) in enumerate(bar):
        images = images.to(dtype)
        first = micro - micro % accum
        window_total = window_sample_count(first, min(first + accum, num_batches), world, batch_size, dataset_len)
        mask = real_sample_mask(micro, len(targets), rank, world, batch_size, dataset_len).to(accelerator.device)
        # accumulate() turns off DDP's gradient all-reduce on all but the last micro-batch of each
        # window (and always syncs at the end of the loader, so no gradient leaks into the next epoch).
        with accelerator.accumulate(model):
            logits = model(images)
            per_sample = loss_fn(logits, targets)
            masked_sum = (per_sample * mask).sum()
            # backward() divides by grad_accum_steps and DDP averages over ranks: undo both, and divide
            # once by the window's real sample count.
            accelerator.backward(masked_sum * (accum * world / window_total))
            grad_norm = None
            if accelerator.sync_gradients and max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()  # a no-op inside an accumulation window
            optimizer.zero_grad(set_to_none=True)
        loss_sum += masked_sum.detach().double()
        step_loss += torch.stack([masked_sum.detach().double(), mask.sum().double()])
        real_local += int(mask.sum())
        local_batches += 1
        local_samples += len(targets)
        window_samples += int(mask.sum())
        if accelerator.sync_gradients:
            steps += 1
            global_step += 1
            if not accelerator.optimizer_step_was_skipped:
                schedule.step()
            if global_step % log_every_n_steps == 0:
                now = time.perf_counter()
                total = accelerator.reduce(step_loss, "sum")
                values = {"train/loss": (total[0] / total[1].clamp(min=1)).item(), "train/lr": schedule.lr()}
                values["train/samples_per_sec"] = window_samples * world / max(now - window_start, 1e-9)
                if grad_norm is not None:
                    values["train/grad_norm"] = float(grad_norm)
                log(values, global_step)
                window_start, window_samples = now, 0
                bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values['train/lr']:.2e}")
            step_loss.zero_()
            if max_steps is not None and global_step >= max_steps:
                loader.end()  # leaving the loop early: unregister it from Accelerate's gradient state
                break
    bar.close()
    totals = accelerator.reduce(
        torch.tensor([loss_sum.item(), real_local, local_samples], dtype=torch.float64, device=accelerator.device), "sum"
    )
    result = EpochResult(
        train_loss=(totals[0] / max(totals[1], 1)).item(),
        optimizer_steps=steps,
        samples=int(totals[1].item()),
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
    dtype = input_dtype(model)
    for images, targets, indices in progress(loader, desc, accelerator):
        images = images.to(dtype)
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
