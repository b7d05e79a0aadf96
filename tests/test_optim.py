"""Optimizers and schedules: weight-decay groups, and LR curves as closed-form functions of optimizer steps."""
import copy
import math

import pytest
import torch
from torch import nn

from dist_train.config import OptimConfig, SchedulerConfig
from dist_train.models.optim import Schedule, build_optimizer, param_groups


def model():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_no_weight_decay_on_biases_and_norms():
    groups = param_groups(model(), 0.05, decay_norm_and_bias=False)
    assert [len(g["params"]) for g in groups] == [2, 4]
    assert all(p.ndim == 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.05
    assert all(p.ndim == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    assert len(param_groups(model(), 0.05, decay_norm_and_bias=True)) == 1


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_optimizers(name, cls):
    m = model()
    m[0].weight.requires_grad_(False)
    opt = build_optimizer(OptimConfig(name=name, lr=0.1, weight_decay=0.01), m)
    assert isinstance(opt, cls) and opt.param_groups[0]["lr"] == 0.1
    assert sum(len(g["params"]) for g in opt.param_groups) == 5  # frozen weights are left out


def lrs(cfg, steps_per_epoch=10, epochs=3, lr=1.0):
    opt = torch.optim.SGD(model().parameters(), lr=lr)
    schedule = Schedule(cfg, opt, steps_per_epoch, steps_per_epoch * epochs, "max")
    out = [schedule.lr()]
    for _ in range(steps_per_epoch * epochs):
        opt.step()
        schedule.step()
        out.append(schedule.lr())
    return out, schedule


def test_warmup_then_cosine_is_closed_form():
    curve, _ = lrs(SchedulerConfig(name="cosine", warmup_epochs=1, warmup_start_factor=0.1, min_lr=0.01))
    warm, total = 10, 30
    for step, lr in enumerate(curve):
        if step < warm:
            expected = 0.1 + 0.9 * step / warm
        else:
            expected = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
        assert lr == pytest.approx(expected, abs=1e-9), step


def test_step_decay_every_n_epochs():
    curve, _ = lrs(SchedulerConfig(name="step", step_size_epochs=1, gamma=0.5))
    assert curve[:10] == [1.0] * 10 and curve[10:20] == [0.5] * 10 and curve[20:30] == [0.25] * 10


def test_constant_with_warmup():
    curve, _ = lrs(SchedulerConfig(name="constant", warmup_epochs=0.5, warmup_start_factor=0.2))
    assert curve[0] == pytest.approx(0.2) and curve[5:] == [1.0] * 26


def test_plateau_reduces_after_patience_and_not_per_step():
    curve, schedule = lrs(SchedulerConfig(name="plateau", plateau_patience=1, plateau_factor=0.5))
    assert curve == [1.0] * 31
    for value, expected in [(0.5, 1.0), (0.5, 1.0), (0.5, 0.5), (0.6, 0.5), (0.6, 0.5), (0.6, 0.25)]:
        schedule.step_metric(value)
        assert schedule.lr() == expected


def test_state_dict_resumes_the_same_curve():
    cfg = SchedulerConfig(name="cosine", warmup_epochs=1)
    full, _ = lrs(cfg)
    opt = torch.optim.SGD(model().parameters(), lr=1.0)
    first = Schedule(cfg, opt, 10, 30, "max")
    for _ in range(13):
        opt.step()
        first.step()
    opt2 = torch.optim.SGD(model().parameters(), lr=1.0)
    second = Schedule(cfg, opt2, 10, 30, "max")
    second.load_state_dict(first.state_dict())
    opt2.param_groups[0]["lr"] = first.lr()  # the optimizer's own state_dict carries the LR on resume
    rest = []
    for _ in range(17):
        opt2.step()
        second.step()
        rest.append(second.lr())
    assert rest == pytest.approx(full[14:])


@pytest.mark.parametrize("cfg", [
    SchedulerConfig(name="cosine", warmup_epochs=0.5, min_lr=0.01),
    SchedulerConfig(name="step", step_size_epochs=1, gamma=0.5, warmup_epochs=1),
    SchedulerConfig(name="constant", warmup_epochs=2),
], ids=["cosine", "step", "constant"])
def test_a_schedule_restarted_under_other_steps_per_epoch_is_where_the_epochs_say(cfg):
    """train.elastic=adapt: 20 steps per epoch for 2 epochs, then 14: each epoch's end has the LR of the original."""
    original, _ = lrs(cfg, steps_per_epoch=20, epochs=4)
    opt = torch.optim.SGD(model().parameters(), lr=1.0)
    before = Schedule(cfg, opt, 20, 80, "max")
    for _ in range(40):
        opt.step()
        before.step()
    state = before.state_dict()
    after = Schedule(cfg, opt, 14, 56, "max")
    after.restart_at_epoch(2, state)
    rescaled = [after.lr()]
    for _ in range(28):
        opt.step()
        after.step()
        rescaled.append(after.lr())
    assert rescaled[0] == pytest.approx(original[40]) and rescaled[14] == pytest.approx(original[60])
    assert rescaled[28] == pytest.approx(original[80])


def test_a_restarted_plateau_schedule_keeps_its_reductions():
    cfg = SchedulerConfig(name="plateau", plateau_patience=0, plateau_factor=0.5, warmup_epochs=0.5)
    opt = torch.optim.SGD(model().parameters(), lr=1.0)
    before = Schedule(cfg, opt, 20, 80, "max")
    for _ in range(20):
        opt.step()
        before.step()
    before.step_metric(0.9)
    before.step_metric(0.8)  # no improvement: halved
    assert before.lr() == 0.5
    optimizer_state = copy.deepcopy(opt.state_dict())  # what the checkpoint holds
    after = Schedule(cfg, opt, 14, 56, "max")  # (building it resets the LR, as torch's schedulers do)
    opt.load_state_dict(optimizer_state)  # as the resume restores it (Accelerate's load_state)
    after.restart_at_epoch(1, before.state_dict())
    assert after.lr() == 0.5 and after.steps == 14
    after.step_metric(0.7)  # still worse than 0.9: its memory of the best came along
    assert after.lr() == 0.25
