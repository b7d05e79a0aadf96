"""What the ranks agree on and gather: every collective of the training loop, each a method of Ranks named for
what it agrees on or gathers, and the sharded prediction of a split (validation, inference) gathered back."""
from __future__ import annotations

import os
import socket
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from dist_train.job.distributed import any_rank, broadcast_buffers, same_on_all_ranks
from dist_train.loop.build import input_dtype
from dist_train.rundir.weights import full_state_dict, state_digest
from dist_train.rundir.report import progress


class Ranks:
    """Every collective of the loop, named for what the ranks agree on or gather. (DDP's gradient all-reduce
    in backward, the guard's verdict under DeepSpeed and the checkpoint's own are documented where they
    happen.) Every rank makes them in the same order:

        start            gather_processes
        optimizer step   [mean_step_loss, every train.log_every_n_steps]
                         [agree_on_signals, every checkpoint.check_every_n_steps]
                         [sum_epoch_totals + Checkpointer.save, when the step policy saves]
        epoch's end      sum_epoch_totals, share_buffers, gather_predictions, rank0_metrics, gather_shards,
                         Checkpointer.save, any_preempted
        end              gather_digests

    Before the loop, fit() and build_parts() make theirs in this order: the lock's outcome (trainer.take_lock), the
    checkpoint to resume (checkpoint.choose_checkpoint), a barrier after tidying the run directory, the main
    process first through the data (a barrier), the batch size every rank can fit (build.largest_batch_that_fits),
    Accelerate's prepare; after it, a barrier before the process group ends.
    """

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    def gather_processes(self) -> list[dict]:
        """Where each rank runs (run_info.json's `processes`)."""
        accelerator = self.accelerator
        return gather_object([{"rank": accelerator.process_index, "machine_rank": int(os.environ.get("GROUP_RANK", 0)),
                               "local_rank": accelerator.local_process_index, "host": socket.gethostname(),
                               "device": str(accelerator.device)}])

    def mean_step_loss(self, step_loss: torch.Tensor, count: int) -> float:
        """The optimizer step's mean loss over the real samples of all ranks (a host sync: logged steps only)."""
        count = torch.tensor(float(count), dtype=torch.float64, device=self.accelerator.device)
        total = self.accelerator.reduce(torch.stack([step_loss, count]), "sum")
        return (total[0] / total[1].clamp(min=1)).item()

    def agree_on_signals(self, signalled: bool, timed_save_due: bool) -> tuple[bool, bool]:
        """Whether a preemption signal reached any rank, and whether a timed save is due (rank 0 judges it)."""
        preempted, timed = any_rank(self.accelerator, signalled, timed_save_due)
        return preempted, timed

    def sum_epoch_totals(self, totals: torch.Tensor) -> list[float]:
        """The epoch's [loss sum, real samples, unreadable samples] so far (engine.EpochTotals), all ranks."""
        return self.accelerator.reduce(totals.clone(), "sum").tolist()

    def share_buffers(self, model: torch.nn.Module, ema) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank, where nothing else keeps them equal: DeepSpeed's
        model, and the EMA's copy (its statistics follow rank 0's, as the model's do under DDP)."""
        broadcast_buffers(self.accelerator, model)
        if ema is not None and self.accelerator.num_processes > 1:
            for buffer in ema.module.buffers():
                torch.distributed.broadcast(buffer.data, src=0)

    def gather_predictions(self, model, loader, loss_fn, prepare_input, beat: Callable[[], None]) -> dict:
        """Every rank's predictions of its shard, gathered on every rank (see predict_gathered)."""
        return predict_gathered(self.accelerator, model, loader, "validate", loss_fn, beat=beat, prepare_input=prepare_input)

    def rank0_metrics(self, metrics: dict) -> dict:
        """Rank 0's metrics on every rank: decisions (best, early stop, plateau) cannot diverge."""
        return same_on_all_ranks(self.accelerator, metrics)

    def gather_shards(self, local_batches: int, local_samples: int) -> list[tuple[int, int, int]]:
        """(rank, batches, samples) of every rank for this epoch, in rank order."""
        return sorted(gather_object([(self.accelerator.process_index, local_batches, local_samples)]))

    def any_preempted(self, signalled: bool) -> bool:
        (preempted,) = any_rank(self.accelerator, signalled)
        return preempted

    def gather_digests(self, model, torch_optimizer, deepspeed: bool) -> tuple[list[str], list[str | None]]:
        """sha256 of every rank's final weights and optimizer state (DeepSpeed's ZeRO optimizers keep their state
        partitioned, outside the torch optimizer: None)."""
        weights = gather_object([state_digest(full_state_dict(self.accelerator, model))])
        optimizer = gather_object([None if deepspeed else state_digest(torch_optimizer.state_dict())])
        return weights, optimizer


# ----------------------------------------------------------------------------------------------
# prediction over every rank's shard (validation, inference)


def default_input(model: torch.nn.Module):
    """Images in the dtype of the model's weights (float32 normally; bf16/fp16 when DeepSpeed keeps them so)."""
    dtype = input_dtype(model)
    return lambda images, targets: (images.to(dtype), targets)


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
