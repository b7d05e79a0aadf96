"""Resuming under another layout: on another number of processes the global batch (and with it the steps per
epoch and every step's learning rate) is kept by changing the accumulation; where it cannot be, train.elastic=adapt
trains on with the new global batch and a schedule rescaled to end at the same epoch; anything else is refused."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dist_train.errors import ConfigError
from dist_train.job.layout import Layout
from dist_train.rundir.checkpoint import epoch_boundary_checkpoint, saved_state


@dataclass(frozen=True)
class Saved:
    """Where a checkpoint stands, as a resuming run must know it before it builds anything."""

    layout: Layout | None
    """[processes, per-process batch, accumulation] of the run that saved it (None: not recorded)."""
    epochs_done: int
    mid_epoch: bool
    boundary: str | None = None
    """The newest checkpoint beside it saved at the end of an epoch (named when a mid-epoch resume is refused)."""

    @classmethod
    def read(cls, checkpoint: Path) -> Saved:
        state = saved_state(checkpoint)
        mid_epoch = bool(state.get("batches_done"))
        boundary = epoch_boundary_checkpoint(checkpoint.parent) if mid_epoch else None
        return cls(Layout(*state["layout"]) if state.get("layout") else None, state["epoch"], mid_epoch,
                   str(boundary) if boundary is not None else None)


def _describe(layout: Layout) -> str:
    steps = f", {layout.steps_per_epoch} optimizer steps per epoch" if layout.samples else ""
    return (f"{layout.processes} process{'es' if layout.processes > 1 else ''} x batch {layout.batch_size} x "
            f"accumulation {layout.accum} (global batch {layout.global_batch}{steps})")


@dataclass(frozen=True)
class Resumption:
    """How a run resumes a checkpoint saved under layout `saved`: on layout `now` (its accumulation chosen)."""

    saved: Layout
    now: Layout
    rescale: bool = False
    """The global batch changed: the schedule restarts at the checkpoint's epoch, counted in this run's steps."""

    @property
    def changed(self) -> bool:
        return self.saved.as_list() != self.now.as_list()

    def resumed(self, samples: int, epochs_done: int, saved_batches: int) -> tuple[str, int]:
        """(message(), the checkpoint's micro-batches per process of its epoch counted in this run's layout: the same
        samples done)."""
        saved, now = self.saved.with_samples(samples), self.now.with_samples(samples)
        line = self.message(samples, epochs_done)
        if saved_batches >= saved.batches_per_process:  # saved at the epoch's last step (a preemption): all done
            return line, now.batches_per_process if saved_batches else 0
        done = saved_batches * saved.processes * saved.batch_size
        if done:
            line += f"; epoch {epochs_done + 1} goes on after its first {done} samples"
        return line, done // (now.processes * now.batch_size)

    def message(self, samples: int, epochs_done: int) -> str:
        """What changed, in one line (`samples`: the training set's size, for the steps per epoch)."""
        saved, now = self.saved.with_samples(samples), self.now.with_samples(samples)
        if not self.rescale:
            return (f"elastic resume: the checkpoint was trained by {_describe(saved)}; this run has {now.processes} "
                    f"process{'es' if now.processes > 1 else ''} x batch {now.batch_size}, so train.grad_accum_steps is "
                    f"{now.accum}: the global batch {now.global_batch}, the {now.steps_per_epoch} steps per epoch and "
                    f"the learning rate at every step stay the run's")
        why = ("train.elastic=adapt" if saved.processes != now.processes
               else "data.batch_size / train.grad_accum_steps differ from the checkpoint's")
        return (f"resume with another global batch ({why}): {saved.global_batch} -> {now.global_batch}, optimizer steps "
                f"per epoch {saved.steps_per_epoch} -> {now.steps_per_epoch} ({_describe(saved)} -> {_describe(now)}); "
                f"the LR schedule is rescaled to {now.steps_per_epoch} steps per epoch and resumes at the start of epoch "
                f"{epochs_done + 1} of it, so it still ends with the last epoch")


def plan(saved: Saved, now: Layout, *, elastic: str = "keep", max_steps: int | None = None,
         deepspeed: bool = False) -> Resumption:
    """How to resume the checkpoint `saved` on layout `now` (its accumulation as configured).

    The same processes: the config's batch settings are the user's choice, taken as they are (a new global batch
    rescales the schedule). Other processes: the accumulation that keeps the checkpoint's global batch, or with
    train.elastic=adapt, when none does, the configured one with a rescaled schedule. Refused: DeepSpeed on other
    processes (its ZeRO state is partitioned per process), a mid-epoch position with another global batch (the rest of
    the epoch would be other batches) or, under DeepSpeed, another layout at all, and a rescaled schedule with train.max_steps (whose steps would count other batches). A mid-epoch position with the global
    batch kept goes on exactly: the sample order is the same on any number of processes and each optimizer step takes
    the next global batch of it, so the checkpoint's k steps are its first k x global batch samples (local_batches)."""
    old = saved.layout or now
    if old.as_list() == now.as_list():
        return Resumption(old, now)
    if deepspeed and old.processes != now.processes:
        raise ConfigError(f"a DeepSpeed checkpoint resumes on the number of processes that saved it ({old.processes}; "
                          f"this run has {now.processes}): its ZeRO state is partitioned per process")
    resumption = Resumption(old, now, rescale=old.global_batch != now.global_batch)
    hint = (f"resume from {saved.boundary}, saved at the end of an epoch" if saved.boundary
            else "no checkpoint saved at an epoch's end exists")
    if old.processes != now.processes:
        per_step = now.processes * now.batch_size
        if old.global_batch % per_step == 0:
            return Resumption(old, Layout(now.processes, now.batch_size, old.global_batch // per_step))
        if elastic != "adapt" or saved.mid_epoch:
            raise ConfigError(f"the checkpoint was trained with global batch {old.global_batch} ({_describe(old)}); "
                              f"{now.processes} process(es) x data.batch_size {now.batch_size} cannot make it with whole "
                              f"accumulation steps. Resume on a number of processes that divides it, change "
                              f"data.batch_size" + (f"; or, for another global batch, {hint} (--resume DIR)" if saved.mid_epoch
                                                    else f", or set train.elastic=adapt to train on with global batch "
                                                         f"{now.global_batch}"))
    if saved.mid_epoch and resumption.rescale:
        raise ConfigError(f"the checkpoint was saved in the middle of epoch {saved.epochs_done + 1} by {_describe(old)}; "
                          f"with global batch {now.global_batch} instead of {old.global_batch} the rest of the epoch "
                          f"would be other batches: {hint} (--resume DIR), or keep the global batch")
    if saved.mid_epoch and deepspeed:
        raise ConfigError(f"the checkpoint was saved in the middle of epoch {saved.epochs_done + 1} by {_describe(old)}; "
                          f"a DeepSpeed run resumes the middle of an epoch on the same layout only: {hint} (--resume "
                          f"DIR), or keep the checkpoint's data.batch_size and train.grad_accum_steps")
    if resumption.rescale and max_steps is not None:
        raise ConfigError(f"resuming with another global batch ({old.global_batch} -> {now.global_batch}) rescales the "
                          f"schedule by epochs, but train.max_steps={max_steps} counts optimizer steps of either batch: "
                          f"leave train.max_steps unset (train.epochs ends the run)")
    return resumption
