"""Losses: each against its definition."""
import pytest
import torch
import torch.nn.functional as F

from dist_train.config import LossConfig
from dist_train.errors import ConfigError
from dist_train.models.losses import CrossEntropy, FocalLoss, SoftF1Loss, build_loss, build_regression_loss

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


def test_one_hot_distributions_give_the_index_loss():
    soft = F.one_hot(TARGETS, 5).float()
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    modules = [
        CrossEntropy(0.0),
        CrossEntropy(0.1, weights),
        FocalLoss(2.0),
        FocalLoss(1.5, alpha=0.25, class_weights=weights),
        SoftF1Loss(5),
    ]
    for module in modules:
        assert torch.allclose(module(LOGITS, soft), module(LOGITS, TARGETS), atol=1e-6), module


def test_soft_targets_smoothing_mixes_with_uniform():
    g = torch.Generator().manual_seed(1)
    soft = torch.rand(16, 5, generator=g).softmax(1)
    s = 0.2
    smoothed = (1 - s) * soft + s / 5
    expected = -(smoothed * F.log_softmax(LOGITS, -1)).sum(1)
    assert torch.allclose(CrossEntropy(s)(LOGITS, soft), expected, atol=1e-6)
    # a mixup pair's loss is the lam-weighted sum of the two index losses
    lam, other = 0.7, TARGETS.flip(0)
    mixed = lam * F.one_hot(TARGETS, 5).float() + (1 - lam) * F.one_hot(other, 5).float()
    ce = CrossEntropy(s)
    assert torch.allclose(ce(LOGITS, mixed), lam * ce(LOGITS, TARGETS) + (1 - lam) * ce(LOGITS, other), atol=1e-6)


@pytest.mark.parametrize("shape", [(16,), (16, 3)])
def test_regression_losses_average_to_torch_mean(shape):
    g = torch.Generator().manual_seed(2)
    preds, targets = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g)
    references = {
        "mse": F.mse_loss(preds, targets),
        "l1": F.l1_loss(preds, targets),
        "huber": F.huber_loss(preds, targets, delta=0.5),
    }
    for name, reference in references.items():
        loss = build_regression_loss(name, delta=0.5)(preds, targets)
        assert loss.shape == (16,)
        assert torch.allclose(loss.mean(), reference, atol=1e-6), name


def test_regression_column_predictions_do_not_broadcast_against_flat_targets():
    preds, targets = torch.randn(16, 1), torch.randn(16)
    loss = build_regression_loss("l1")(preds, targets)
    assert torch.allclose(loss, (preds[:, 0] - targets).abs())


def test_unknown_regression_loss_is_rejected():
    with pytest.raises(ConfigError, match="mse"):
        build_regression_loss("msee")
