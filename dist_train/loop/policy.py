"""The run's decisions as pure functions: after an optimizer step (save? preempt? end the epoch?) and after
an evaluation (improved? stop?). They know no ranks and no devices: the loop feeds them facts every rank
already agrees on, so every rank decides the same, and they are tested from tables without processes."""
from __future__ import annotations

from dataclasses import dataclass

from dist_train.config import CheckpointConfig, TrainConfig


@dataclass(frozen=True)
class StepDecision:
    save: bool
    """Save a checkpoint now (in the middle of the epoch, or because of a preemption)."""
    preempt: bool
    """Stop after that save: a preemption signal reached some rank."""
    end_epoch: bool
    """Leave the epoch now (train.max_steps reached): validation and the epoch's save follow."""


@dataclass(frozen=True)
class StepRules:
    """What the loop decides after each optimizer step."""

    batches_per_epoch: int
    max_steps: int | None = None
    every_n_steps: int | None = None
    every_n_minutes: float | None = None
    check_every_n_steps: int = 5

    @classmethod
    def of(cls, train: TrainConfig, checkpoint: CheckpointConfig, batches_per_epoch: int) -> StepRules:
        return cls(batches_per_epoch, train.max_steps, checkpoint.every_n_steps, checkpoint.every_n_minutes,
                   checkpoint.check_every_n_steps)

    def checks_at(self, step: int) -> bool:
        """Whether the ranks agree on signals and timed saves after optimizer step `step` (one all-reduce)."""
        return step % self.check_every_n_steps == 0

    def timed_save_due(self, seconds_since_save: float) -> bool:
        """checkpoint.every_n_minutes has passed since the last save (judged by rank 0, then agreed)."""
        return self.every_n_minutes is not None and seconds_since_save >= 60 * self.every_n_minutes

    def reached_max(self, step: int) -> bool:
        return self.max_steps is not None and step >= self.max_steps

    def after_step(self, step: int, batches_done: int, preempted: bool = False, timed: bool = False) -> StepDecision:
        """`step`: optimizer steps taken; `batches_done`: micro-batches of this epoch done (per process);
        `preempted` / `timed`: what the ranks agreed at a check step (False otherwise)."""
        end_epoch = self.reached_max(step)
        mid_epoch = batches_done < self.batches_per_epoch and not end_epoch  # else the epoch's own save follows
        due = (self.every_n_steps is not None and step % self.every_n_steps == 0) or timed
        return StepDecision(save=preempted or (due and mid_epoch), preempt=preempted, end_epoch=end_epoch)


@dataclass(frozen=True)
class EvalDecision:
    improved: bool
    """The monitored metric beat the best so far: this epoch's checkpoint becomes `best`."""
    evals_without_improvement: int
    stop: str | None
    """None to go on; "max_steps" or "patience" (early stopping) to end the run after this epoch."""


def is_improvement(value: float, best: float | None, mode: str) -> bool:
    """Strictly better than `best` (a NaN never is); the first evaluation always is."""
    if best is None:
        return True
    return value > best if mode == "max" else value < best


@dataclass(frozen=True)
class EvalRules:
    """What the loop decides after each evaluation."""

    mode: str
    epochs: int
    patience: int = 0
    max_steps: int | None = None

    @classmethod
    def of(cls, train: TrainConfig, checkpoint: CheckpointConfig) -> EvalRules:
        return cls(checkpoint.mode, train.epochs, train.early_stopping_patience, train.max_steps)

    def after_evaluation(self, value: float, best: float | None, evals_without_improvement: int, epoch: int,
                         step: int) -> EvalDecision:
        """`epoch`: epochs completed, this one included; `step`: optimizer steps taken."""
        improved = is_improvement(value, best, self.mode)
        waited = 0 if improved else evals_without_improvement + 1
        stop = None
        if self.max_steps is not None and step >= self.max_steps:
            stop = "max_steps"
        elif self.patience and waited >= self.patience and epoch < self.epochs:
            stop = "patience"
        return EvalDecision(improved, waited, stop)

    def starts_epoch(self, step: int) -> bool:
        """Whether another epoch begins (a run resumed after reaching train.max_steps has none left)."""
        return self.max_steps is None or step < self.max_steps
