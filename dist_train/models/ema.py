"""An exponential moving average of a model's weights, evaluated in place of the model."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """`module` is a frozen copy of the model whose parameters follow ema = decay * ema + (1 - decay) * p.

    Buffers (BatchNorm running statistics, counters) are copied, not averaged, as timm's ModelEmaV3 does:
    the running statistics are already averages, and integer buffers cannot be averaged. `warmup` lowers
    the decay for early updates to min(decay, (1 + n) / (10 + n)), n being the number of earlier updates,
    so that the average is not dominated by the random initial weights.

    Pass the plain module (the caller unwraps DDP / Accelerate). Its `state_dict` carries the update
    count, so a resumed run continues the same warmup.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ModelEMA: decay must be in [0, 1], got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next `update` uses."""
        if self.warmup:
            return min(self.decay, (1 + self.updates) / (10 + self.updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model`'s current weights; call after each optimizer step."""
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError(f"ModelEMA.update: model has {len(params)} parameters, the average {len(ema_params)}")
        torch._foreach_lerp_(ema_params, params, 1.0 - self.current_decay())
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
