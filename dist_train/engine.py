"""The explicit loop: train_one_epoch and evaluate. Everything else (what to build, when to save) lives elsewhere."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from dist_train import faults
from dist_train.distributed import main_print
from dist_train.errors import TrainingError
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
    """Samples seen by this process (over the whole epoch, also before a resume)."""
    local_batches: int
    seconds: float
    skipped_samples: int = 0
    """Unreadable images (data.bad_samples=skip) among the real samples of all processes."""
    data_seconds: float = 0.0
    """Of `seconds`, the time this process waited for the loader's next batch."""


class EpochTotals:
    """This rank's running sums over an epoch's good steps: [loss, real samples, unreadable samples].

    They stay on the device (no host sync per step). A checkpoint in the middle of an epoch stores
    their all-rank values (`reduced`); the resumed run carries them on rank 0, so that the epoch's
    train loss and counts cover the whole epoch.
    """

    def __init__(self, device, carried: list[float] | None = None):
        self.values = torch.tensor(carried or [0.0, 0.0, 0.0], dtype=torch.float64, device=device)

    def reduced(self, accelerator: Accelerator) -> list[float]:
        return accelerator.reduce(self.values.clone(), "sum").tolist()


class FiniteGuard:
    """Skips every optimizer step whose loss or gradient is NaN/Inf on any rank, the same way on every rank.

    The verdict is a flag on the device that every rank computes alike. Under DDP (`via_gradients`) it
    costs no communication of its own: a rank whose loss is not finite scales its backward by NaN
    (`carry`), DDP's gradient all-reduce spreads any NaN/Inf to every rank, and each rank judges the
    all-reduced gradients, which are the same everywhere. Elsewhere (DeepSpeed, FSDP) the local verdicts
    are all-reduced: one small collective per optimizer step. With a fused torch optimizer the verdict never
    leaves the device: it goes to the optimizer as `found_inf` (the protocol torch's GradScaler uses), which
    leaves weights, moments and step count as they were, and the counters stay on the device until `poll`
    reads them (every checkpoint.check_every_n_steps and before each save). Otherwise (other optimizers,
    DeepSpeed, policy stop) each step reads the flag at once: one host sync per optimizer step.
    """

    def __init__(self, accelerator: Accelerator, torch_optimizer: torch.optim.Optimizer, policy: str, max_bad: int,
                 kept, skipped: int = 0, in_a_row: int = 0, via_gradients: bool = False):
        self.accelerator, self.torch_optimizer, self.policy, self.max_bad, self.kept = accelerator, torch_optimizer, policy, max_bad, kept
        self.via_gradients = via_gradients and accelerator.num_processes > 1
        self.sync_free = (policy == "skip" and bool(torch_optimizer.defaults.get("fused"))
                          and accelerator.distributed_type != DistributedType.DEEPSPEED and accelerator.scaler is None)
        # skipped in all, bad steps in a row, the step at which a run of max_bad ended, the last bad step
        self.counts = torch.tensor([skipped, in_a_row, 0, 0], dtype=torch.int64, device=accelerator.device)
        self.skipped, self.in_a_row = skipped, in_a_row

    def step(self, optimizer, step_loss: torch.Tensor, grad_norm, step: int) -> torch.Tensor:
        """optimizer.step() unless optimizer step number `step` is bad; returns the 0-d bool verdict."""
        if self.via_gradients:  # the all-reduced gradients carry every rank's verdict (see carry)
            if grad_norm is None:
                grads = [p.grad for group in self.torch_optimizer.param_groups for p in group["params"] if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=step_loss.device)
            bad = ~torch.isfinite(torch.as_tensor(grad_norm, device=step_loss.device))
        else:
            bad = ~torch.isfinite(step_loss)
            if grad_norm is not None:
                bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=step_loss.device))
            if self.accelerator.num_processes > 1:
                flag = bad.to(torch.float32).reshape(1)
                torch.distributed.all_reduce(flag)
                bad = flag[0] > 0
        flag = bad.to(torch.float32)  # exactly 1.0 or 0.0: the fused kernels skip on found_inf == 1 only
        counts, hit = self.counts, bad.long()
        counts[0] += hit
        counts[1] = (counts[1] + 1) * hit
        counts[2] = torch.where((counts[1] >= self.max_bad) & (counts[2] == 0), step, counts[2])
        counts[3] = torch.where(bad, step, counts[3])
        if self.sync_free:
            self.torch_optimizer.found_inf, self.torch_optimizer.grad_scale = flag, None
            try:
                optimizer.step()
            finally:
                del self.torch_optimizer.found_inf, self.torch_optimizer.grad_scale
        elif not self.poll(step):
            optimizer.step()
        return bad

    def carry(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate: itself (times exactly 1.0) when finite; times NaN when not, which makes
        every gradient it reaches NaN, and DDP's all-reduce then tells every rank. (A non-finite loss alone
        need not make the gradients so: a constant NaN term, or an Inf cross-entropy with label smoothing.)"""
        if not self.via_gradients:
            return loss
        return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))

    def poll(self, step: int) -> bool:
        """Reads the counters: warns about skipped steps, raises TrainingError when the policy says stop.
        Returns whether the newest step was bad."""
        skipped, self.in_a_row, run_end, last_bad = self.counts.tolist()
        new, self.skipped = skipped - self.skipped, skipped
        if not new:
            return False
        if self.policy == "stop":
            raise TrainingError(f"step {last_bad}: the loss or gradient is not finite on some rank (train.nonfinite=stop); "
                                f"stopped. {self.kept()}")
        if run_end:
            raise TrainingError(f"steps {run_end - self.max_bad + 1}-{run_end}: {self.max_bad} optimizer steps in a row had a "
                                f"non-finite loss or gradient (train.max_bad_steps={self.max_bad}); stopped at step {step}. "
                                f"{self.kept()}")
        which = f"step {last_bad}" if new == 1 else f"{new} steps up to step {last_bad}"
        main_print(self.accelerator, f"warning: {which}: non-finite loss or gradient on some rank; every rank skipped it "
                                     f"({self.in_a_row} in a row, {skipped} in all)")
        return last_bad == step


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """float32 normally (autocast does mixed precision); bf16/fp16 when DeepSpeed keeps the weights in it."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def real_rows(micro_batch: int, batch_len: int, rank: int, world: int, batch_size: int, dataset_len: int) -> int:
    """How many leading rows of this rank's micro-batch are real samples; the rest are repeats padding the epoch.

    Accelerate deals the sampler's batches out round-robin (batch k to rank k % world) and completes the
    last ones with indices from the epoch's start, so row j of micro-batch m on rank r sits at position
    m*world*b + r*b + j of the epoch's sample order, and is real iff that position is < len(dataset).
    (tests/test_sharding.py pins this layout against Accelerate's BatchSamplerShard.) Plain integers:
    no device work, no host sync.
    """
    start = micro_batch * world * batch_size + rank * batch_size
    return max(0, min(batch_len, dataset_len - start))


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
    log,
    epoch: int,
    num_batches: int,
    start_batch: int = 0,
    on_step=None,
    totals: EpochTotals | None = None,
    guard: FiniteGuard | None = None,
    skip_bad_samples: bool = False,
    prepare_input=None,
    beat=lambda: None,
    mix=None,
) -> tuple[EpochResult, int]:
    """One pass over this process's shard; returns the result and the new optimizer-step count.

    `loader` yields micro-batches start_batch..num_batches-1 of the epoch (start_batch > 0 after a
    resume in the middle of an epoch). After each optimizer step `on_step(batches_done, global_step,
    finite)` may save a checkpoint or stop the run; it returns True to end the epoch there.

    Each optimizer step follows the gradient of the mean loss over the real samples of its window, all
    ranks together: padding repeats weigh 0 and a short last window is normalised by its own size, so
    N processes x batch b x accumulation A take the same steps as 1 process with batch N*b*A.
    With a `guard`, a step whose loss or gradient is not finite on any rank is skipped by every rank, so
    the weights stay finite and identical. `prepare_input(images, targets)` makes the model's input
    (data.ModelInput: decode on the device, dtype, memory layout); `mix(images, targets, epoch, micro)` mixes a
    batch (mixup/CutMix) into soft targets. Nothing in a step waits for the device:
    the loss and counters stay there and are read every `log_every_n_steps`.
    """
    model.train()
    start = time.perf_counter()
    world, rank, accum = accelerator.num_processes, accelerator.process_index, grad_accum_steps
    if num_batches != expected_batches_per_rank(dataset_len, batch_size, world):
        raise RuntimeError(f"the loader has {num_batches} batches per process; the sharding layout this loop relies on "
                           f"gives {expected_batches_per_rank(dataset_len, batch_size, world)}")
    totals = totals or EpochTotals(accelerator.device)
    step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)  # this step's, read when logged
    steps = step_count = 0
    local_batches, local_samples = start_batch, start_batch * batch_size  # batches before a resume were full
    window_start = time.perf_counter()
    window_samples = 0
    prepare_input = prepare_input or default_input(model)
    bar = progress(loader, f"epoch {epoch}", accelerator)
    batches, data_seconds = iter(bar), 0.0
    for micro in range(start_batch, num_batches):
        waited = time.perf_counter()
        try:
            images, targets, _ = next(batches)
        except StopIteration:
            break
        data_seconds += time.perf_counter() - waited
        beat()
        images, targets = prepare_input(images, targets)
        first = micro - micro % accum
        window_total = window_sample_count(first, min(first + accum, num_batches), world, batch_size, dataset_len)
        real = real_rows(micro, len(targets), rank, world, batch_size, dataset_len)
        if skip_bad_samples:  # unreadable images arrive as blanks with target BAD_TARGET: they weigh nothing
            readable = targets >= 0
            totals.values[2] += (~readable[:real]).sum()
            targets = targets.clamp(min=0)
        if mix is not None:
            images, targets = mix(images, targets, epoch, micro)
        # accumulate() turns off DDP's gradient all-reduce on all but the last micro-batch of each
        # window (and always syncs at the end of the loader, so no gradient leaks into the next epoch).
        with accelerator.accumulate(model):
            logits = model(images)
            beat()
            per_sample = loss_fn(logits, targets)
            if skip_bad_samples:
                per_sample = per_sample * readable
            real_loss_sum = per_sample[:real].sum()
            if faults.planned("nan", f"step:{global_step + 1}"):  # a NaN loss and gradient
                real_loss_sum = real_loss_sum * float("nan")
            if faults.planned("nanloss", f"step:{global_step + 1}"):  # a NaN loss whose gradient is finite
                real_loss_sum = real_loss_sum + float("nan")
            if guard is not None:
                real_loss_sum = guard.carry(real_loss_sum)
            # backward() divides by grad_accum_steps and DDP averages over ranks: undo both, and divide
            # once by the window's real sample count.
            accelerator.backward(real_loss_sum * (accum * world / window_total))
            step_loss += real_loss_sum.detach().double()
            grad_norm, bad = None, None
            if accelerator.sync_gradients:
                if max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                if guard is not None:
                    bad = guard.step(optimizer, step_loss, grad_norm, global_step + 1)
                else:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        faults.inject(f"batch:{(epoch - 1) * num_batches + micro + 1}")
        step_count += real
        local_batches += 1
        local_samples += len(targets)
        window_samples += real
        if accelerator.sync_gradients:
            steps += 1
            global_step += 1
            if bad is None:
                totals.values[0] += step_loss
                totals.values[1] += step_count
            else:  # a skipped step's loss (NaN, say) stays out of the epoch's mean
                totals.values[0] += torch.where(bad, 0.0, step_loss)
                totals.values[1] += torch.where(bad, 0, step_count)
            if not accelerator.optimizer_step_was_skipped:
                schedule.step()  # a step skipped as non-finite still counts: the LR follows the step count
            if global_step % log_every_n_steps == 0:
                now = time.perf_counter()
                count = torch.tensor(float(step_count), dtype=torch.float64, device=accelerator.device)
                total = accelerator.reduce(torch.stack([step_loss, count]), "sum")
                values = {"train/loss": (total[0] / total[1].clamp(min=1)).item(), "train/lr": schedule.lr()}
                values.update(schedule.group_lrs())  # each layer group's LR (optim.layer_decay)
                values["train/samples_per_sec"] = window_samples * world / max(now - window_start, 1e-9)
                if grad_norm is not None:
                    values["train/grad_norm"] = float(grad_norm)
                log(values, global_step)
                window_start, window_samples = now, 0
                # shown at the bar's next redraw (refreshing now would print a stale count into log files)
                bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values['train/lr']:.2e}", refresh=False)
            step_loss.zero_()
            step_count = 0
            beat()
            if on_step is not None and on_step(micro + 1, global_step):
                loader.end()  # leaving the loop early: unregister it from Accelerate's gradient state
                break
    bar.close()
    loss, real_samples, skipped = totals.reduced(accelerator)
    result = EpochResult(
        train_loss=loss / max(real_samples, 1),
        optimizer_steps=steps,
        samples=int(real_samples),
        local_samples=local_samples,
        local_batches=local_batches,
        seconds=time.perf_counter() - start,
        skipped_samples=int(skipped),
        data_seconds=data_seconds,
    )
    return result, global_step


def default_input(model: torch.nn.Module):
    """Images in the dtype of the model's weights (float32 normally; bf16/fp16 when DeepSpeed keeps them so)."""
    dtype = input_dtype(model)
    return lambda images, targets: (images.to(dtype), targets)


def largest_batch_that_fits(accelerator: Accelerator, model: torch.nn.Module, start: int, sample_shape: tuple) -> int:
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
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            size //= 2
        finally:
            out = None
            model.zero_grad(set_to_none=True)
            if accelerator.device.type == "cuda":
                torch.cuda.empty_cache()
    model.train(was_training)
    agreed = torch.tensor([size], device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
    return int(agreed.item())


@torch.inference_mode()
def predict_gathered(accelerator: Accelerator, model: torch.nn.Module, loader, desc: str, loss_fn=None,
                     beat=lambda: None, prepare_input=None):
    """Logits, targets, dataset indices (and per-sample losses) of the whole split, gathered on every rank.

    `gather_for_metrics` drops the repeats that pad the last batches, so each sample appears exactly once;
    the returned indices let callers check that and restore the input order. (Unreadable images skipped
    under data.bad_samples=skip come back with a negative target; metrics leave them out.)
    """
    model.eval()
    outputs = {"logits": [], "targets": [], "indices": [], "losses": []}
    prepare_input = prepare_input or default_input(model)
    for images, targets, indices in progress(loader, desc, accelerator):
        beat()
        images, targets = prepare_input(images, targets)
        with accelerator.autocast():
            logits = model(images)
        batch = {"logits": logits.float(), "targets": targets, "indices": indices}
        if loss_fn is not None:
            batch["losses"] = loss_fn(logits, targets if targets.is_floating_point() else targets.clamp(min=0))
        for key, value in accelerator.gather_for_metrics(batch).items():
            outputs[key].append(value)  # kept on the device: one copy to the host at the end, no sync per batch
    return {k: torch.cat(v).cpu() if v else torch.empty(0) for k, v in outputs.items()}


def check_each_once(indices: torch.Tensor, expected: int, what: str) -> None:
    """The gathered indices must be a permutation of range(expected): no sample lost or counted twice."""
    if len(indices) != expected or not torch.equal(torch.sort(indices).values, torch.arange(expected)):
        raise RuntimeError(f"{what}: gathered {len(indices)} predictions for {expected} samples (lost or duplicated rows)")
