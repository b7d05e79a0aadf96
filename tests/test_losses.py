"""Losses: each against its definition."""
import torch
import torch.nn.functional as F

from dist_train.config import LossConfig
from dist_train.losses import build_loss

torch.manual_seed(0)
LOGITS = torch.randn(16, 5, dtype=torch.float32)
TARGETS = torch.randint(0, 5, (16,))


def test_cross_entropy_and_label_smoothing_match_torch():
    for smoothing in (0.0, 0.1):
        loss = build_loss(LossConfig(name="cross_entropy", label_smoothing=smoothing), 5)(LOGITS, TARGETS)
        assert loss.shape == (16,)
        assert torch.allclose(loss.mean(), F.cross_entropy(LOGITS, TARGETS, label_smoothing=smoothing))
    # smoothing by hand: (1 - s) * nll + s * mean over classes of -log p
    s = 0.1
    log_p = F.log_softmax(LOGITS, -1)
    manual = (1 - s) * -log_p.gather(1, TARGETS[:, None]).squeeze(1) + s * -log_p.mean(-1)
    assert torch.allclose(build_loss(LossConfig(label_smoothing=s), 5)(LOGITS, TARGETS), manual, atol=1e-6)


def test_focal_with_gamma_zero_is_cross_entropy_and_down_weights_easy_samples():
    ce = F.cross_entropy(LOGITS, TARGETS, reduction="none")
    assert torch.allclose(build_loss(LossConfig(name="focal", focal_gamma=0.0), 5)(LOGITS, TARGETS), ce, atol=1e-6)
    focal = build_loss(LossConfig(name="focal", focal_gamma=2.0), 5)(LOGITS, TARGETS)
    p = torch.exp(-ce)
    assert torch.allclose(focal, (1 - p) ** 2 * ce, atol=1e-6)
    assert torch.all(focal <= ce + 1e-7)


def test_class_weights_scale_per_sample_losses():
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    loss = build_loss(LossConfig(class_weights=weights), 5)(LOGITS, TARGETS)
    ce = F.cross_entropy(LOGITS, TARGETS, reduction="none")
    assert torch.allclose(loss, ce * torch.tensor(weights)[TARGETS], atol=1e-6)


def test_soft_f1_is_near_zero_when_perfect_and_differentiable():
    loss_fn = build_loss(LossConfig(name="f1"), 5)
    perfect = F.one_hot(TARGETS, 5).float() * 50
    assert loss_fn(perfect, TARGETS).mean() < 1e-3
    logits = LOGITS.clone().requires_grad_(True)
    loss = loss_fn(logits, TARGETS).mean()
    assert 0 < loss.item() < 1
    loss.backward()
    assert logits.grad.abs().sum() > 0
