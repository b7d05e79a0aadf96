"""The interface every task kind implements: targets, output size, loss, metrics, submission columns."""
from __future__ import annotations

import torch
from torch import nn

from dist_train.config import monitorable
from dist_train.data.columns import Column
from dist_train.errors import ConfigError


class Task:
    """The interface the trainer and inference use; see the subclasses."""

    kind: str
    num_outputs: int
    class_names: list[str] | None = None
    """Names of the predicted classes (combined for multihead); None for values and scores."""

    def encode(self, columns: dict[str, Column], where: str) -> torch.Tensor:
        """Targets of the rows, one tensor row each: a class index (int64), several heads' indices (int64), or values
        (float32)."""
        raise NotImplementedError

    def loss(self) -> nn.Module:
        """Maps (outputs (N, num_outputs), targets) to per-sample losses (N,)."""
        raise NotImplementedError

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, groups=None) -> dict:
        """val_* numbers (and extras such as the confusion matrix) from the whole split's gathered outputs."""
        raise NotImplementedError

    def headline(self) -> list[str]:
        """The metrics the epoch line prints."""
        return monitorable(self.config)[:3]

    def average(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Several predictions of the same rows (test-time augmentation, an ensemble) made one: classes
        average their probabilities (returned as log-probabilities, so argmax and softmax still apply),
        values and scores average themselves."""
        return torch.stack(outputs).mean(0)

    def predictions(self, outputs: torch.Tensor) -> list[str]:
        """The submission's label column."""
        raise NotImplementedError

    def target_labels(self, targets: torch.Tensor) -> list[str]:
        """Targets written as predictions() writes its answers (class name, combined class id, value)."""
        return self.predictions(targets.float())

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """(N, len(class_names)) probabilities of the predicted classes (inference.probabilities)."""
        raise ConfigError(f"inference.probabilities: task.kind={self.kind} predicts no classes")
