"""Regression: one or more numeric columns, the model's outputs the values."""
from __future__ import annotations

import torch

from dist_train.config import Config
from dist_train.data.tables import float_column
from dist_train.models.losses import build_regression_loss
from dist_train.models.metrics import regression_metrics
from dist_train.models.tasks.base import Task


class Regression(Task):
    """One or more numeric columns; the model's outputs are the values (an MSE, L1 or Huber loss)."""

    kind = "regression"

    def __init__(self, config: Config, targets: list[str]):
        self.config, self.columns, self.num_outputs = config, list(targets), len(targets)

    def encode(self, columns, where):
        return torch.stack([float_column(columns[c], f"{where}, column {c!r}") for c in self.columns], 1).float()

    def loss(self):
        return build_regression_loss(self.config.task.loss, self.config.task.huber_delta)

    def metrics(self, outputs, targets, losses, groups=None):
        return {"val_loss": losses.double().mean().item(), **regression_metrics(outputs, targets),
                "val_samples": len(targets)}

    def headline(self):
        return ["val_loss", "val_mae", "val_rmse"]

    def predictions(self, outputs):
        if self.num_outputs == 1:
            return [f"{v:.6g}" for v in outputs.float().reshape(-1).tolist()]
        return [" ".join(f"{v:.6g}" for v in row) for row in outputs.float().tolist()]
