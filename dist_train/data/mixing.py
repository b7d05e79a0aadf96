"""Mixup and CutMix on a batch, as timm's `Mixup` in batch mode: mixed images and soft targets."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dist_train.config import DataConfig


def _soft_targets(targets: torch.Tensor, num_classes: int, lam: float, label_smoothing: float) -> torch.Tensor:
    """lam of each sample's own class plus 1 - lam of its partner's, smoothed towards uniform. Targets that are rows of
    per-class values already ((N, C) multi-hot: multi-label) are mixed as they are (timm's Mixup does the same)."""
    if targets.is_floating_point() and targets.ndim == 2:
        return targets.float() * lam + targets.float().flip(0) * (1.0 - lam)
    off = label_smoothing / num_classes
    onehot = F.one_hot(targets.long(), num_classes).float() * (1.0 - label_smoothing) + off
    return onehot * lam + onehot.flip(0) * (1.0 - lam)


def _cut_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box of area about (1 - lam) of the image around a uniform centre, clipped at the borders."""
    ratio = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


def mix_batch(
    images: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.0,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix images (N, C, H, W) with the batch reversed, one lambda ~ Beta(alpha, alpha) per batch.

    With probability `prob` the batch is mixed, by CutMix with probability `switch_prob` when both alphas
    are > 0 (an alpha of 0 turns that method off). CutMix's lambda is corrected to the area the clipped box
    really kept. Returns new images (the input itself when unmixed; it is never modified) and (N,
    num_classes) float targets whose rows sum to 1, for `CrossEntropy`/`FocalLoss` (multi-hot rows: mixed by lambda,
    each class's target in [0, 1], for the binary losses).

    All randomness comes from `generator`, so seeding it from (seed, step, rank) makes a run replayable.
    `label_smoothing` here equals smoothing in the loss (both are linear): use one of the two, not both.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("mix_batch: mixup_alpha or cutmix_alpha must be > 0")
    # torch's Beta sampler takes no generator: draw one seed from it for numpy's
    seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
    rng = np.random.default_rng(seed)
    lam, use_cutmix = 1.0, False
    if rng.random() < prob:
        use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
        alpha = cutmix_alpha if use_cutmix else mixup_alpha
        lam = float(rng.beta(alpha, alpha))
    mixed = images
    if use_cutmix:
        height, width = images.shape[-2:]
        top, bottom, left, right = _cut_box(height, width, lam, rng)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = images.flip(0)[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    elif lam < 1.0:
        mixed = images * lam + images.flip(0) * (1.0 - lam)
    return mixed, _soft_targets(targets, num_classes, lam, label_smoothing)


class BatchMixer:
    """Mixup/CutMix of the loop's micro-batches (data.mixup_alpha, data.cutmix_alpha); the randomness of each is a
    function of (seed, epoch, micro-batch, rank) only, so a resumed or replayed run mixes exactly the same."""

    def __init__(self, cfg: DataConfig, num_classes: int, seed: int, rank: int):
        self.cfg, self.num_classes, self.seed, self.rank = cfg, num_classes, seed, rank

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, epoch: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`epoch` counts from 1, `micro` from 0 within the epoch."""
        seed = ((self.seed * 1_000_003 + epoch) * 1_000_033 + micro) * 1_009 + self.rank
        return mix_batch(images, targets, self.num_classes, mixup_alpha=self.cfg.mixup_alpha,
                         cutmix_alpha=self.cfg.cutmix_alpha, prob=self.cfg.mix_prob, switch_prob=self.cfg.mix_switch_prob,
                         generator=torch.Generator().manual_seed(seed))
