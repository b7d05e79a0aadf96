"""ModelEMA: the closed-form average, warmup, buffers copied, a state_dict round trip."""
import pytest
import torch
from torch import nn

from dist_train.models.ema import ModelEMA


def _model(weight: float) -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(weight)
    return model


def _set(model: nn.Module, weight: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(weight)


def test_average_matches_closed_form():
    d = 0.9
    w0, values = 0.5, [1.0, 2.0, 3.0, 4.0]
    model = _model(w0)
    ema = ModelEMA(model, decay=d)
    for value in values:
        _set(model, value)
        ema.update(model)
    # ema_n = d^n * w_0 + (1 - d) * sum_i d^(n - i) * w_i
    n = len(values)
    expected = d**n * w0 + sum((1 - d) * d ** (n - i) * v for i, v in enumerate(values, start=1))
    for p in ema.module.parameters():
        assert torch.allclose(p, torch.full_like(p, expected))
        assert not p.requires_grad
    assert not ema.module.training and ema.updates == 4


def test_warmup_decay_and_first_update():
    model = _model(0.0)
    ema = ModelEMA(model, decay=0.99, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)
    _set(model, 1.0)
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, torch.full((2, 3), 0.9))
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.updates = 10_000
    assert ema.current_decay() == 0.99


def test_buffers_are_copied_and_model_unchanged():
    model = _model(0.5)
    ema = ModelEMA(model, decay=0.5)
    model.train()(torch.randn(8, 3))  # moves BatchNorm's running statistics and counter
    ema.update(model)
    for ema_buffer, buffer in zip(ema.module.buffers(), model.buffers()):
        assert torch.equal(ema_buffer, buffer)
    assert ema.module[1].num_batches_tracked.item() == 1
    assert all(bool((p == 0.5).all()) for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_state_dict_round_trip():
    model = _model(0.0)
    ema = ModelEMA(model, decay=0.8, warmup=True)
    for value in (1.0, 3.0):
        _set(model, value)
        ema.update(model)
    restored = ModelEMA(_model(7.0), decay=0.8, warmup=True)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 2 and restored.current_decay() == ema.current_decay()
    for a, b in zip(restored.module.state_dict().values(), ema.module.state_dict().values()):
        assert torch.equal(a, b)
    _set(model, 5.0)
    ema.update(model)
    restored.update(model)
    for a, b in zip(restored.module.parameters(), ema.module.parameters()):
        assert torch.equal(a, b)


def test_mismatched_model_is_rejected():
    ema = ModelEMA(_model(0.0))
    with pytest.raises(ValueError, match="parameters"):
        ema.update(nn.Linear(3, 2))
