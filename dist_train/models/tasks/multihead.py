"""Several heads over one backbone, each its own label column, loss and weight, combined into one class."""
from __future__ import annotations

import torch
from torch import nn

from dist_train.config import Config
from dist_train.data.tables import encode_classes
from dist_train.errors import ConfigError
from dist_train.models.losses import build_loss
from dist_train.models.metrics import classification_metrics
from dist_train.models.tasks.base import Task


class MultiHead(Task):
    """Several heads over one backbone, each its own label column, loss and weight.

    The model's last layer has sum(head sizes) outputs, sliced in head order: one linear layer of
    sum(sizes) rows is exactly a separate linear head per task on the shared features. The combined class
    is the mixed-radix number of the head classes, in the order the heads are listed:
        combined = ((c_1 * n_2 + c_2) * n_3 + c_3) ...
    e.g. mask (3) x gender (2) x age (3): combined = 6 * mask + 3 * gender + age, 18 classes, named
    "wear/male/<30". Its probability is the product of the heads' (they are predicted independently).
    """

    kind = "multihead"

    def __init__(self, config: Config, heads: dict[str, list[str]]):
        self.config = config
        self.heads = config.task.heads
        missing = [h.name for h in self.heads if h.name not in heads]
        if missing:
            raise ConfigError(f"task.heads {missing} are not in the checkpoint's heads ({', '.join(heads)})")
        self.head_classes = [list(heads[h.name]) for h in self.heads]
        self.sizes = [len(c) for c in self.head_classes]
        self.num_outputs = sum(self.sizes)
        self.class_names = ["/".join(parts) for parts in _product(self.head_classes)]
        self.losses = nn.ModuleList(build_loss(h.loss, n) for h, n in zip(self.heads, self.sizes))

    def split(self, outputs: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(outputs, self.sizes, dim=1))

    def combine(self, head_classes: torch.Tensor) -> torch.Tensor:
        """(N, heads) class indices -> (N,) combined class indices."""
        combined = torch.zeros(len(head_classes), dtype=torch.long, device=head_classes.device)
        for h, size in enumerate(self.sizes):
            combined = combined * size + head_classes[:, h]
        return combined

    def encode(self, columns, where):
        per_head = [encode_classes(columns[h.column], classes, f"{where}, column {h.column!r}")
                    for h, classes in zip(self.heads, self.head_classes)]
        return torch.stack(per_head, 1)

    def loss(self):
        return _MultiHeadLoss(self)

    def metrics(self, outputs, targets, losses, groups=None):
        metrics = {"val_loss": losses.double().mean().item()}
        head_preds = []
        for h, (head, logits) in enumerate(zip(self.heads, self.split(outputs))):
            m = classification_metrics(logits, targets[:, h], losses)  # the loss slot is unused below
            for key in ("val_accuracy", "val_f1_macro", "val_precision_macro", "val_recall_macro"):
                metrics[f"val_{head.name}_{key[4:]}"] = m[key]
            metrics[f"{head.name}_confusion_matrix"] = m["confusion_matrix"]
            head_preds.append(logits.argmax(1))
        combined_logits = self.combined_log_probabilities(outputs)
        m = classification_metrics(combined_logits, self.combine(targets), losses)
        metrics.update({k: v for k, v in m.items() if k != "val_loss"})
        return metrics

    def combined_log_probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """(N, prod(sizes)) log-probabilities of the combined classes: sums of the heads' log-probabilities."""
        total = torch.zeros(len(outputs), 1, device=outputs.device)
        for logits in self.split(outputs.float()):
            total = (total[:, :, None] + logits.log_softmax(1)[:, None, :]).flatten(1)
        return total

    def headline(self):
        return ["val_loss", "val_accuracy", *[f"val_{h.name}_accuracy" for h in self.heads]]

    def average(self, outputs):
        heads = zip(*(self.split(o.float()) for o in outputs))
        return torch.cat([torch.stack([v.softmax(1) for v in views]).mean(0).log() for views in heads], dim=1)

    def predictions(self, outputs):
        return [str(c) for c in self.combined_log_probabilities(outputs).argmax(1).tolist()]

    def target_labels(self, targets):
        return [str(c) for c in self.combine(targets).tolist()]

    def probabilities(self, outputs):
        return self.combined_log_probabilities(outputs).exp()


class _MultiHeadLoss(nn.Module):
    """sum over heads of weight * the head's per-sample loss."""

    def __init__(self, task: MultiHead):
        super().__init__()
        self.task = task
        self.losses = task.losses
        self.weights = [h.weight for h in task.heads]

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for h, (loss, logits) in enumerate(zip(self.losses, self.task.split(outputs))):
            total = total + self.weights[h] * loss(logits, targets[:, h])
        return total


def _product(lists: list[list[str]]) -> list[list[str]]:
    combos = [[]]
    for options in lists:
        combos = [c + [o] for c in combos for o in options]
    return combos
