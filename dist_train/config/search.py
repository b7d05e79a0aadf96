"""The hpo section (hyper-parameter search) and its search space: keys of the run's config and the values trials try.

The study itself (Optuna, the trials, their directories) is commands/hpo.py; the space's checks are checks.check_space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class SearchDimension:
    """A key of hpo.space: `optim.lr: {type: float, low: 1e-4, high: 1e-2, log: true}`, `model.name: {type: categorical, choices: [small_cnn, mlp]}`."""

    type: Literal["float", "int", "categorical"] = "float"
    low: float | None = None
    """float and int: the smallest value (int: a whole number); `high`: the largest (included)."""
    high: float | None = None
    log: bool = False
    """float and int: sample on a log scale (low must be positive), e.g. for learning rates and weight decay."""
    step: float | None = None
    """float and int: only low, low + step, low + 2 step, ... (int: default 1); not with log."""
    choices: list[Any] | None = None
    """categorical: the values (numbers, strings, booleans or null), e.g. [small_cnn, timm/resnet18]."""


@dataclass
class HPOConfig:
    """Hyper-parameter search (Optuna): hpo.trials > 0 makes `train.py` a study, shared by its workers through
    <output_dir>/hpo.journal; trial n is this config with hpo.space's keys set, run in <output_dir>/trial-<n>."""

    trials: int = 0
    """Trials of the study in all (every worker together, failed and pruned ones included); 0: no search."""
    space: dict[str, SearchDimension] = field(default_factory=dict)
    """Config key -> the values to search, e.g. `{optim.lr: {type: float, low: 1e-4, high: 1e-2, log: true}}`."""
    objective: str | None = None
    """The val_* metric to optimise (its direction: min for losses and errors, else max): with cv.folds its value
    over the out-of-fold predictions of all folds, else the hold-out value of the best epoch. None: checkpoint.monitor."""
    sampler: Literal["tpe", "gp", "random"] = "tpe"
    """tpe (with constant liar: parallel workers do not sample the same point), gp (Gaussian process) or random."""
    seed: int | None = None
    """Seed of the sampler (trial n draws from seed + n, whichever worker asks); None: the run's seed."""
    startup_trials: int = 10
    """tpe and gp: trials sampled at random before the sampler models the results."""
    pruner: Literal["none", "median", "wilcoxon"] = "none"
    """Stop hopeless trials early. median: after an epoch whose objective is worse than the median of earlier trials at
    that epoch (hold-out studies); wilcoxon: after a fold, when a Wilcoxon signed-rank test of the folds' scores says
    the trial is worse than the best one (cv.folds >= 3)."""
    prune_startup_trials: int = 2
    """median: finished trials before any trial is pruned; `prune_warmup_epochs`: a trial's first epochs never are."""
    prune_warmup_epochs: int = 1
    prune_p: float = 0.1
    """wilcoxon: the p-value below which a trial is pruned (0.1 needs 4 folds to prune; 0.3, 3)."""
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    """Trials to run first, each a mapping of hpo.space keys to values (e.g. the config's own, as a baseline)."""
