"""Training losses, per sample: cross-entropy (label smoothing), focal, soft macro-F1 on logits; multi-label binary
cross-entropy, sigmoid focal and asymmetric (ASL) losses; MSE, L1, Huber."""
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
    weights = per_class(cfg.class_weights, num_classes, "loss.class_weights")
    if cfg.name == "cross_entropy":
        return CrossEntropy(cfg.label_smoothing, weights)
    if cfg.name == "focal":
        return FocalLoss(cfg.focal_gamma, cfg.focal_alpha, weights)
    if cfg.name == "f1":
        return SoftF1Loss(num_classes)
    raise ConfigError(f"loss.name={cfg.name} is a multi-label loss (task.kind=multilabel); one class per row takes "
                      f"cross_entropy, focal or f1")


class BinaryLoss(nn.Module):
    """Multi-label, per sample: a binary loss of each class's logit against its (N, C) target in [0, 1] (multi-hot, or
    soft: mixup, a teacher, pseudo-labels), averaged over the classes as torch's `BCEWithLogitsLoss` and torchvision's
    `sigmoid_focal_loss` average (`reduction="mean"`); ASL is summed over the classes, as its paper and timm's
    `reduction="batchmean"` do. `label_smoothing` moves every target towards 0.5 (timm's smoothing for ASL);
    `pos_weight` scales each class's positive term, `class_weights` each class's whole term."""

    def __init__(self, name: str, label_smoothing: float = 0.0, pos_weight: torch.Tensor | None = None,
                 class_weights: torch.Tensor | None = None, focal_gamma: float = 2.0, focal_alpha: float | None = None,
                 asl: dict | None = None):
        super().__init__()
        self.name, self.label_smoothing = name, label_smoothing
        self.focal_gamma, self.focal_alpha = focal_gamma, focal_alpha
        self.register_buffer("pos_weight", pos_weight, persistent=False)
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.asl = None
        if name == "asl":
            from timm.loss import AsymmetricLossMultiLabel

            self.asl = AsymmetricLossMultiLabel(**(asl or {}), smoothing=label_smoothing, reduction="none",
                                                weight=class_weights, pos_weight=pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = logits.float(), targets.float()
        if self.asl is not None:
            return self.asl(logits, targets).sum(1)
        if self.label_smoothing:
            targets = targets * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        if self.name == "focal":
            from torchvision.ops import sigmoid_focal_loss

            alpha = -1.0 if self.focal_alpha is None else self.focal_alpha  # torchvision: alpha < 0 weighs nothing
            loss = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=self.focal_gamma, reduction="none")
            if self.pos_weight is not None:  # (torchvision's has no pos_weight: the positive term scaled as BCE's is)
                loss = loss * (1.0 + (self.pos_weight - 1.0) * targets)
        else:
            loss = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight, reduction="none")
        if self.class_weights is not None:
            loss = loss * self.class_weights
        return loss.mean(1)


MULTILABEL_LOSSES = ("bce", "focal", "asl")


def build_multilabel_loss(cfg: LossConfig, num_classes: int, positives: list[int] | None = None,
                          rows: int | None = None) -> nn.Module:
    """A module mapping (logits, (N, C) targets) to per-sample losses. loss.name cross_entropy means bce here (a
    sigmoid's cross-entropy per class). loss.pos_weight: a list (one per class), or balanced: negatives / positives of
    each class in the training table (`positives`, `rows`: classes.json's counts), a class without positives 1."""
    if cfg.file is not None:
        return build_loss(cfg, num_classes)
    name = "bce" if cfg.name == "cross_entropy" else cfg.name
    if name not in MULTILABEL_LOSSES:
        raise ConfigError(f"loss.name={cfg.name}: task.kind=multilabel takes {', '.join(MULTILABEL_LOSSES)} (or "
                          f"cross_entropy, meaning bce)")
    weights = per_class(cfg.class_weights, num_classes, "loss.class_weights")
    pos_weight = None
    if cfg.pos_weight == "balanced":
        if positives is None or rows is None:
            raise ConfigError("loss.pos_weight=balanced needs the training table's class counts (the built-in tables); "
                              "with your own datasets give one value per class")
        counts = torch.tensor(positives, dtype=torch.float64)
        pos_weight = torch.where(counts > 0, (rows - counts) / counts.clamp(min=1), torch.ones_like(counts)).float()
    else:
        pos_weight = per_class(cfg.pos_weight, num_classes, "loss.pos_weight")
    asl = {"gamma_neg": cfg.asl_gamma_neg, "gamma_pos": cfg.asl_gamma_pos, "clip": cfg.asl_clip}
    return BinaryLoss(name, cfg.label_smoothing, pos_weight, weights, cfg.focal_gamma, cfg.focal_alpha, asl)


def per_class(values: list[float] | None, num_classes: int, key: str) -> torch.Tensor | None:
    """A config list of one value per class as a float32 tensor (None stays None); another length is a ConfigError."""
    if values is None:
        return None
    if len(values) != num_classes:
        raise ConfigError(f"{key} has {len(values)} values for {num_classes} classes")
    return torch.tensor(values, dtype=torch.float32)


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
