"""Training losses, per sample: cross-entropy (label smoothing), focal, soft macro-F1 on logits; MSE, L1, Huber."""
from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.config import LossConfig
from dist_train.custom import PerSampleLoss, load_function
from dist_train.errors import ConfigError


class CrossEntropy(nn.Module):
    """Per-sample cross-entropy; `label_smoothing` spreads that much probability mass over all classes.

    Targets are class indices (N,) or distributions (N, C) such as mixup's; smoothing and class weights
    apply to both, so a one-hot distribution gives the same loss as its index.
    """

    def __init__(self, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.is_floating_point():
            targets = targets.float()  # torch takes probability targets of the logits' dtype
        return F.cross_entropy(
            logits.float(), targets, weight=self.class_weights, label_smoothing=self.label_smoothing, reduction="none"
        )


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma; gamma=0 is cross-entropy.

    With target distributions (N, C) each class's term is weighted by its target probability:
    -sum_c t_c (1 - p_c)^gamma log p_c, which is the index form for one-hot rows.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.is_floating_point():
            return self._soft(logits, targets.float())
        log_p = F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
        loss = -((1.0 - log_p.exp()) ** self.gamma) * log_p
        if self.alpha is not None:
            loss = self.alpha * loss
        if self.class_weights is not None:
            loss = loss * self.class_weights[targets]
        return loss

    def _soft(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1)
        terms = -targets * (1.0 - log_p.exp()) ** self.gamma * log_p
        if self.class_weights is not None:
            terms = terms * self.class_weights
        loss = terms.sum(1)
        return self.alpha * loss if self.alpha is not None else loss


class SoftF1Loss(nn.Module):
    """1 - macro-F1 computed from softmax probabilities (differentiable). A batch-level loss: the
    per-sample value returned is the batch loss repeated, so that averaging keeps it unchanged.
    Target distributions (N, C) stand in for the one-hot rows of class indices."""

    def __init__(self, num_classes: int, eps: float = 1e-7):
        super().__init__()
        self.num_classes = num_classes
        self.eps = eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(logits.float(), dim=-1)
        onehot = targets if targets.is_floating_point() else F.one_hot(targets, self.num_classes)
        onehot = onehot.to(probs.dtype)
        tp = (probs * onehot).sum(0)
        fp = (probs * (1 - onehot)).sum(0)
        fn = ((1 - probs) * onehot).sum(0)
        f1 = 2 * tp / (2 * tp + fp + fn + self.eps)
        return (1 - f1.mean()).expand(len(targets))


def build_loss(cfg: LossConfig, num_classes: int, given: nn.Module | None = None) -> nn.Module:
    """A module mapping (logits, targets) to per-sample losses; the engine decides how to average.

    `given` (a loss given to Trainer) or cfg.file's build_loss(cfg, num_classes) takes the place of `cfg.name`.
    """
    if given is not None:
        return PerSampleLoss(given, "the loss given")
    if cfg.file is not None:
        return PerSampleLoss(load_function(cfg.file, "build_loss", "loss.file")(cfg, num_classes),
                             f"loss.file {cfg.file}: build_loss(...)")
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


RegressionLossName = Literal["mse", "l1", "huber"]


class RegressionLoss(nn.Module):
    """Per-sample regression loss: the element-wise loss averaged over each sample's outputs, so that the
    engine's mean over samples equals torch's `reduction="mean"`. `delta`: huber only, where the loss turns
    from quadratic to linear."""

    def __init__(self, name: RegressionLossName = "mse", delta: float = 1.0):
        super().__init__()
        self.name = name
        self.delta = delta

    def forward(self, preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # (N, 1) predictions against (N,) targets would otherwise broadcast to (N, N)
        preds, targets = preds.float().reshape(targets.shape), targets.float()
        if self.name == "mse":
            loss = F.mse_loss(preds, targets, reduction="none")
        elif self.name == "l1":
            loss = F.l1_loss(preds, targets, reduction="none")
        else:
            loss = F.huber_loss(preds, targets, reduction="none", delta=self.delta)
        return loss.flatten(1).mean(1) if loss.ndim > 1 else loss


def build_regression_loss(name: RegressionLossName, delta: float = 1.0) -> RegressionLoss:
    """A module mapping (predictions, targets) to per-sample losses; rejects unknown names early."""
    if name not in get_args(RegressionLossName):
        raise ConfigError(f"unknown regression loss {name!r}; choose one of {', '.join(get_args(RegressionLossName))}")
    if delta <= 0:
        raise ConfigError(f"huber delta must be > 0, got {delta}")
    return RegressionLoss(name, delta)
