"""Resuming on another number of processes: the global batch (and with it the steps per epoch and every step's
learning rate) is kept by changing the accumulation; where it cannot be, train.elastic=adapt trains on with the
new global batch and a schedule rescaled to end at the same epoch, and anything else is refused."""
from __future__ import annotations

from dataclasses import dataclass

from dist_train.errors import ConfigError
from dist_train.layout import Layout


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
    """The global batch changed (train.elastic=adapt): the schedule restarts at the epoch, in the new steps."""

    @property
    def changed(self) -> bool:
        return self.saved.as_list() != self.now.as_list()

    def message(self, samples: int, epochs_done: int) -> str:
        """What changed, in one line (`samples`: the training set's size, for the steps per epoch)."""
        saved, now = self.saved.with_samples(samples), self.now.with_samples(samples)
        if not self.rescale:
            return (f"elastic resume: the checkpoint was trained by {_describe(saved)}; this run has {now.processes} "
                    f"process{'es' if now.processes > 1 else ''} x batch {now.batch_size}, so train.grad_accum_steps is "
                    f"{now.accum}: the global batch {now.global_batch}, the {now.steps_per_epoch} steps per epoch and "
                    f"the learning rate at every step stay the run's")
        return (f"elastic resume (train.elastic=adapt): the global batch changes from {saved.global_batch} to "
                f"{now.global_batch} and the optimizer steps per epoch from {saved.steps_per_epoch} to {now.steps_per_epoch} "
                f"({_describe(saved)} -> {_describe(now)}); the LR schedule is rescaled to {now.steps_per_epoch} steps per "
                f"epoch and resumes at the start of epoch {epochs_done + 1} of it, so it still ends with the last epoch")


def plan(saved: Layout, now: Layout, epochs_done: int, mid_epoch: bool, elastic: str, boundary: str | None) -> Resumption:
    """How to resume a checkpoint saved under layout `saved` on layout `now` (its accumulation as configured).
    `epochs_done`: the checkpoint's; `mid_epoch`: saved in the middle of an epoch; `elastic`: train.elastic;
    `boundary`: the newest checkpoint saved at the end of an epoch, named when a mid-epoch resume is refused."""
    if saved.as_list() == now.as_list():
        return Resumption(saved, now)
    if mid_epoch:
        hint = f"resume from {boundary}, saved at the end of an epoch" if boundary else "no checkpoint at an epoch's end exists"
        raise ConfigError(f"the checkpoint was saved in the middle of epoch {epochs_done + 1} by {_describe(saved)}; "
                          f"under {_describe(now)} that position means other samples: {hint} (--resume DIR)")
    per_step = now.processes * now.batch_size
    if saved.global_batch % per_step == 0:
        return Resumption(saved, Layout(now.processes, now.batch_size, saved.global_batch // per_step))
    if elastic != "adapt":
        raise ConfigError(f"the checkpoint was trained with global batch {saved.global_batch} ({_describe(saved)}); "
                          f"{now.processes} process(es) x data.batch_size {now.batch_size} cannot make it with whole "
                          f"accumulation steps. Resume on a number of processes that divides it, change data.batch_size, "
                          f"or set train.elastic=adapt to train on with global batch {now.global_batch}")
    return Resumption(saved, now, rescale=True)
