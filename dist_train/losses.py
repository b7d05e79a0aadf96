"""Training losses on logits: cross-entropy (with label smoothing), focal, and soft macro-F1."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.config import LossConfig
from dist_train.errors import ConfigError


class CrossEntropy(nn.Module):
    """Per-sample cross-entropy; `label_smoothing` spreads that much probability mass over all classes."""

    def __init__(self, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.float(), targets, weight=self.class_weights, label_smoothing=self.label_smoothing, reduction="none"
        )


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma; gamma=0 is cross-entropy."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
        loss = -((1.0 - log_p.exp()) ** self.gamma) * log_p
        if self.alpha is not None:
            loss = self.alpha * loss
        if self.class_weights is not None:
            loss = loss * self.class_weights[targets]
        return loss


class SoftF1Loss(nn.Module):
    """1 - macro-F1 computed from softmax probabilities (differentiable). A batch-level loss: the
    per-sample value returned is the batch loss repeated, so that averaging keeps it unchanged."""

    def __init__(self, num_classes: int, eps: float = 1e-7):
        super().__init__()
        self.num_classes = num_classes
        self.eps = eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(logits.float(), dim=-1)
        onehot = F.one_hot(targets, self.num_classes).to(probs.dtype)
        tp = (probs * onehot).sum(0)
        fp = (probs * (1 - onehot)).sum(0)
        fn = ((1 - probs) * onehot).sum(0)
        f1 = 2 * tp / (2 * tp + fp + fn + self.eps)
        return (1 - f1.mean()).expand(len(targets))


def build_loss(cfg: LossConfig, num_classes: int) -> nn.Module:
    """A module mapping (logits, targets) to per-sample losses; the engine decides how to average."""
    weights = None
    if cfg.class_weights is not None:
        if len(cfg.class_weights) != num_classes:
            raise ConfigError(f"loss.class_weights has {len(cfg.class_weights)} values for {num_classes} classes")
        weights = torch.tensor(cfg.class_weights, dtype=torch.float32)
    if cfg.name == "cross_entropy":
        return CrossEntropy(cfg.label_smoothing, weights)
    if cfg.name == "focal":
        return FocalLoss(cfg.focal_gamma, cfg.focal_alpha, weights)
    return SoftF1Loss(num_classes)
