"""Mixup/CutMix: targets are distributions, pixels and target weights agree, a seed replays a batch."""
import pytest
import torch

from dist_train.data.mixing import mix_batch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _batch(device: str, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 16, 20, generator=g).to(device), torch.arange(n).to(device)  # class i = sample i


def _mix(images, targets, seed, **kwargs):
    return mix_batch(images, targets, len(targets), generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_targets_are_distributions(device):
    images, targets = _batch(device)
    for seed in range(10):
        _, soft = _mix(images, targets, seed, label_smoothing=0.1)
        assert soft.shape == (8, 8) and soft.device == images.device
        assert torch.allclose(soft.sum(1), torch.ones(8, device=device))
        assert bool((soft > 0).all())  # smoothing reaches every class


@pytest.mark.parametrize("device", DEVICES)
def test_unmixed_batch_is_returned_as_is(device):
    images, targets = _batch(device)
    mixed, soft = _mix(images, targets, 0, prob=0.0)
    assert torch.equal(mixed, images)
    assert torch.equal(soft, torch.eye(8, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_mixup_is_the_lambda_weighted_pair(device):
    images, targets = _batch(device)
    for seed in range(5):
        mixed, soft = _mix(images, targets, seed, mixup_alpha=0.4, cutmix_alpha=0.0)
        lam = soft[0, 0].item()
        assert torch.allclose(soft.diagonal(), torch.full((8,), lam, device=device))
        assert torch.allclose(soft.flip(1).diagonal(), torch.full((8,), 1 - lam, device=device))
        assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0), atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_cutmix_pixels_come_from_the_pair_and_weights_are_the_area(device):
    images, targets = _batch(device)
    boxes = 0
    for seed in range(20):
        mixed, soft = _mix(images, targets, seed, mixup_alpha=0.0, cutmix_alpha=1.0)
        from_self = (mixed == images).all(1)  # (N, H, W): every channel from the sample itself
        from_partner = (mixed == images.flip(0)).all(1)
        assert bool((from_self ^ from_partner).all())  # each pixel from exactly one of the two images
        partner_area = from_partner.double().mean((1, 2))
        assert torch.allclose(soft.flip(1).diagonal().double(), partner_area)
        assert torch.allclose(soft.diagonal().double(), 1 - partner_area)
        boxes += bool(partner_area[0] > 0)
    assert boxes > 10


def test_same_seed_same_batch_and_switch_uses_both_methods():
    images, targets = _batch("cpu")
    a, b = _mix(images, targets, 3), _mix(images, targets, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    outputs = [_mix(images, targets, seed)[0] for seed in range(20)]
    cut = [bool(((out == images).all(1) | (out == images.flip(0)).all(1)).all()) for out in outputs]
    assert any(cut) and not all(cut)  # switch_prob=0.5 picks CutMix for some seeds, mixup for others
    assert not torch.equal(outputs[0], outputs[1])


def test_no_method_is_rejected():
    images, targets = _batch("cpu")
    with pytest.raises(ValueError, match="alpha"):
        _mix(images, targets, 0, mixup_alpha=0.0, cutmix_alpha=0.0)
