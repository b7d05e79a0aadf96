"""Single-label classification: one label column, one class per row."""
from __future__ import annotations

import torch

from dist_train.config import Config
from dist_train.data.tables import encode_classes
from dist_train.models.losses import build_loss
from dist_train.models.metrics import classification_metrics
from dist_train.models.tasks.base import Task


class Classification(Task):
    """One label column, one class per row (the digits run)."""

    kind = "classification"

    def __init__(self, config: Config, classes: list[str]):
        self.config, self.class_names, self.num_outputs = config, list(classes), len(classes)

    def encode(self, columns, where):
        return encode_classes(columns[self.config.data.label_column], self.class_names, where)

    def loss(self):
        return build_loss(self.config.loss, self.num_outputs)

    def metrics(self, outputs, targets, losses, groups=None):
        top_k = tuple(k for k in self.config.task.top_k if k < self.num_outputs)
        return classification_metrics(outputs, targets, losses, with_roc_auc=self.config.task.roc_auc, top_k=top_k)

    def headline(self):
        return ["val_loss", "val_accuracy", "val_f1_macro"]

    def average(self, outputs):
        return torch.stack([o.float().log_softmax(-1).exp() for o in outputs]).mean(0).log()

    def predictions(self, outputs):
        return [self.class_names[i] for i in outputs.argmax(1).tolist()]

    def target_labels(self, targets):
        return [self.class_names[i] for i in targets.tolist()]

    def probabilities(self, outputs):
        return outputs.float().softmax(1)
