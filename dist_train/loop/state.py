"""The loop's records: the run's resumable state (RunState, in every checkpoint's trainer_state.json), an epoch in
progress on a rank with its counters on the device, one micro-batch as the model sees it, and an epoch's result."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from tqdm.auto import tqdm


@dataclass
class RunState:
    """Where the run is and what it has decided so far; saved in every checkpoint (trainer_state.json)."""

    epoch: int = 0
    """Epochs completed."""
    batches_done: int = 0
    """Micro-batches of epoch `epoch` + 1 already trained on, per process (a save in the middle of an epoch)."""
    global_step: int = 0
    """Optimizer steps taken."""
    best_metric: float | None = None
    best_epoch: int | None = None
    best_checkpoint: str | None = None
    evals_without_improvement: int = 0
    skipped_samples: int = 0
    """Unreadable images replaced by blanks that weigh nothing (data.bad_samples=skip), all ranks."""
    epoch_totals: list[float] = field(default_factory=list)
    """Mid-epoch: the epoch's [loss sum, real samples, unreadable samples] so far, all ranks (EpochTotals)."""
    layout: list[int] = field(default_factory=list)
    """[processes, per-process batch, accumulation] of this run (a loaded state keeps this run's)."""
    history: list[dict] = field(default_factory=list)
    """Per epoch: what each rank saw (batches, samples) -- the run's own record of its sharding."""
    thresholds: list[float] | None = None
    """task.kind=multilabel: the decision thresholds of the latest evaluation (tuned on it under task.threshold=tune),
    which predict.py applies to this checkpoint's predictions."""

    def state_dict(self) -> dict:
        state = asdict(self)
        if state["thresholds"] is None:  # (a task without thresholds saves what it saved before)
            del state["thresholds"]
        return state

    def load_state_dict(self, state: dict) -> None:
        for name in (f.name for f in fields(self) if f.name != "layout"):
            if name in state:
                setattr(self, name, state[name])


@dataclass
class EpochResult:
    train_loss: float
    """Mean over this epoch's real samples of all processes (padding repeats excluded)."""
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
    their all-rank values; the resumed run carries them on rank 0, so that the epoch's train loss and
    counts cover the whole epoch.
    """

    def __init__(self, device, carried: list[float] | None = None):
        self.values = torch.tensor(carried or [0.0, 0.0, 0.0], dtype=torch.float64, device=device)


@dataclass
class Epoch:
    """An epoch in progress on this rank: where it started, its loader, and its running counters (those on the
    device are read when a step is logged and at the epoch's end: no host sync per step)."""

    number: int
    """Counted from 1."""
    first_batch: int
    """Micro-batches done before this process started (> 0 after a resume in the middle of the epoch)."""
    loader: Any
    bar: tqdm
    totals: EpochTotals
    step_loss: torch.Tensor
    """The current optimizer step's real loss sum on this rank, on the device."""
    step_count: int = 0
    """The current optimizer step's real samples on this rank."""
    grad_norm: Any = None
    """The last optimizer step's gradient norm before clipping (None without clipping)."""
    local_batches: int = 0
    local_samples: int = 0
    window_samples: int = 0
    """Real samples since the last logged step on this rank (for samples/s)."""
    window_start: float = field(default_factory=time.perf_counter)
    data_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.batches = iter(self.bar)

    def next_batch(self):
        """The loader's next batch (None when it is exhausted), timing the wait for it."""
        waited = time.perf_counter()
        try:
            batch = next(self.batches)
        except StopIteration:
            return None
        self.data_seconds += time.perf_counter() - waited
        return batch

    def count(self, micro: MicroBatch) -> None:
        self.step_count += micro.real
        self.local_batches += 1
        self.local_samples += len(micro.targets)
        self.window_samples += micro.real

    def add_step(self, bad: torch.Tensor | None) -> None:
        """The finished optimizer step's loss and samples into the epoch's totals (a skipped step's stay out)."""
        if bad is None:
            self.totals.values[0] += self.step_loss
            self.totals.values[1] += self.step_count
        else:  # a skipped step's loss (NaN, say) stays out of the epoch's mean
            self.totals.values[0] += torch.where(bad, 0.0, self.step_loss)
            self.totals.values[1] += torch.where(bad, 0, self.step_count)


@dataclass
class MicroBatch:
    """One micro-batch as the model sees it, and what the loss must know of its rows."""

    index: int
    """Within the epoch, counted from 0."""
    images: torch.Tensor
    targets: torch.Tensor
    real: int
    """Leading rows that are real samples (the rest are repeats padding the epoch: they weigh 0)."""
    window_samples: int
    """Real samples, all ranks, of its accumulation window: the step's loss is their mean."""
    readable: torch.Tensor | None = None
    """data.bad_samples=skip: which rows are readable images (the others weigh 0)."""
    teacher: torch.Tensor | None = None
    """distill.teacher: the teacher's outputs for these rows (cached, or run live on `images`)."""
