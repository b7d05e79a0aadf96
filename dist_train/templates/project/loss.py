"""The loss: build_loss returns a module mapping (logits, targets) to ONE LOSS PER SAMPLE, shape (batch,).
dist_train averages them itself, exactly, over processes and gradient accumulation. torch's own losses
(nn.CrossEntropyLoss(), ...) work as they are: dist_train sets their `reduction` to "none"."""
import torch.nn.functional as F
from torch import nn


class SmoothedCrossEntropy(nn.Module):
    def __init__(self, label_smoothing: float):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits, targets):
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing, reduction="none")


def build_loss(cfg, num_classes: int) -> nn.Module:
    return SmoothedCrossEntropy(cfg.label_smoothing)
