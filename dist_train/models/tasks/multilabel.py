"""Multi-label: any number of classes per row, each present or not, with tuned decision thresholds."""
from __future__ import annotations

import numpy as np
import torch

from dist_train.config import Config
from dist_train.data.tables import binary_column, encode_label_sets, label_set_names, sorted_labels
from dist_train.errors import ConfigError
from dist_train.models.losses import build_multilabel_loss
from dist_train.models.metrics import multilabel_metrics, tune_thresholds
from dist_train.models.tasks.base import Task


class MultiLabel(Task):
    """Any number of classes per row, each present or not: one logit per class, a sigmoid each, a binary loss (bce, focal,
    asl), threshold-free mAP and F1 at the decision thresholds -- task.threshold for every class, or (tune) one per class
    tuned on the validation predictions (thresholds_for). The submission writes each row's predicted classes, joined by
    task.label_separator (the Kaggle layout: `id,label` / `p001,3 7 12`)."""

    kind = "multilabel"

    def __init__(self, config: Config, labels: dict):
        self.config, self.class_names = config, list(labels["multilabel"])
        self.num_outputs = len(self.class_names)
        if self.num_outputs < 2:  # (scikit-learn's per-row scores need two columns; one class is binary classification)
            raise ConfigError(f"task.kind=multilabel needs at least 2 classes, not {self.class_names}: one class present or "
                              f"not is task.kind=classification with 2 classes")
        self.positives, self.rows = labels.get("positives"), labels.get("rows")
        threshold = config.task.threshold
        # one per class; None (task.threshold=tune) until tuned ones are given, metrics() tuning them on what it scores
        self.thresholds = None if threshold == "tune" else np.full(self.num_outputs, float(threshold))

    def use_thresholds(self, thresholds) -> None:
        values = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        if len(values) != self.num_outputs:
            raise ConfigError(f"{len(values)} thresholds for {self.num_outputs} classes")
        self.thresholds = values

    def thresholds_for(self, outputs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
        """The thresholds to score these rows with: the fixed or given ones, else tuned on them (task.threshold=tune)."""
        if self.thresholds is not None:
            return self.thresholds
        return tune_thresholds(outputs.float().sigmoid(), targets, self.config.task.threshold_beta)

    def encode(self, columns, where):
        if self.config.task.targets:
            return torch.stack([binary_column(columns[c], f"{where}, column {c!r}") for c in self.config.task.targets], 1)
        column = self.config.data.label_column
        return encode_label_sets(columns[column], self.class_names, self.config.task.label_separator,
                                 f"{where}, column {column!r}")

    def count(self, targets: torch.Tensor) -> dict:
        """What the training table's labels define: the classes, each one's positive rows and the number of rows."""
        self.positives, self.rows = [int(n) for n in (targets > 0.5).sum(0).tolist()], len(targets)
        return {"multilabel": self.class_names, "positives": self.positives, "rows": self.rows}

    def loss(self):
        return build_multilabel_loss(self.config.loss, self.num_outputs, self.positives, self.rows)

    def metrics(self, outputs, targets, losses, groups=None):
        return self.metrics_at(outputs, targets, losses, self.thresholds_for(outputs, targets))

    def metrics_at(self, outputs, targets, losses, thresholds) -> dict:
        """metrics() at these thresholds (one per class, or a row of them per row)."""
        return {"val_loss": losses.double().mean().item(),
                **multilabel_metrics(outputs.float().sigmoid(), targets, thresholds)}

    def headline(self):
        return ["val_loss", "val_map_macro", "val_f1_samples"]

    def average(self, outputs):
        """The classes' probabilities averaged, as logits again (so that a sigmoid still gives them)."""
        return torch.logit(torch.stack([o.float().sigmoid() for o in outputs]).mean(0), eps=1e-7)

    def predictions(self, outputs):
        if self.thresholds is None:
            raise ValueError("multilabel predictions need thresholds: tuned ones given (use_thresholds) or task.threshold")
        return self.predictions_at(outputs, self.thresholds)

    def predictions_at(self, outputs, thresholds) -> list[str]:  # (thresholds: one per class, or a row of them per row)
        thresholds = np.asarray(thresholds, dtype=np.float64)
        return self._joined(outputs.float().sigmoid().numpy() >= (thresholds if thresholds.ndim == 2 else thresholds[None, :]))

    def target_labels(self, targets):
        return self._joined(targets.numpy() > 0.5)

    def probabilities(self, outputs):
        return outputs.float().sigmoid()

    def _joined(self, present: np.ndarray) -> list[str]:
        names, separator = self.class_names, self.config.task.label_separator
        return [separator.join(names[c] for c in np.flatnonzero(row)) for row in present]


def multilabel_classes(config: Config, columns: dict) -> list[str]:
    """The classes of a multi-label task: task.targets (one 0/1 column per class), else data.classes, else the sorted
    union of the class names in the training table's data.label_column."""
    if config.task.targets:
        return list(config.task.targets)
    if config.data.classes is not None:
        return list(config.data.classes)
    return sorted_labels(label_set_names(columns[config.data.label_column], config.task.label_separator))
