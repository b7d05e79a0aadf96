"""Optimizers with weight-decay parameter groups, and LR schedules counted in optimizer steps."""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from dist_train.config import OptimConfig, SchedulerConfig


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Trainable parameters split so that biases and normalisation weights (1-D tensors) skip decay."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if decay_norm_and_bias or param.ndim > 1 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: OptimConfig, model: nn.Module, fused: bool = True) -> torch.optim.Optimizer:
    """`fused`: the default when optim.fused is None (fused kernels unless DeepSpeed runs the optimizer)."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias)
    kernels = {"fused": True} if (cfg.fused if cfg.fused is not None else fused) else {"foreach": None}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **kernels)
    optimizer_class = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return optimizer_class(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kernels)


class Schedule:
    """The learning rate as a function of optimizer steps, plus ReduceLROnPlateau on the monitored metric.

    Built from torch's own schedulers: LinearLR warm-up, then StepLR / CosineAnnealingLR with their
    periods converted from epochs to optimizer steps. It is stepped by the engine once per *optimizer*
    step (never per micro-batch or per process: Accelerate's prepared scheduler would step once per
    process, decaying N times too fast), and `step_metric` once per evaluation with the same value on
    every rank.
    """

    def __init__(self, cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total: int, mode: str):
        self.cfg, self.optimizer, self.steps_per_epoch, self.total, self.mode = cfg, optimizer, steps_per_epoch, total, mode
        self.warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        self._build()

    def _build(self) -> None:
        """torch's schedulers on the optimizer, at step 0 (constructing them sets each group's LR to its start)."""
        cfg, optimizer, steps_per_epoch = self.cfg, self.optimizer, self.steps_per_epoch
        after_warmup = max(1, self.total - self.warmup_steps)
        if cfg.name == "step":
            main = torch.optim.lr_scheduler.StepLR(optimizer, max(1, round(cfg.step_size_epochs * steps_per_epoch)), cfg.gamma)
        elif cfg.name == "cosine":
            main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, after_warmup, eta_min=cfg.min_lr)
        else:  # constant, plateau: flat between warm-up and plateau reductions
            main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
        if self.warmup_steps > 0:
            warmup = torch.optim.lr_scheduler.LinearLR(optimizer, cfg.warmup_start_factor, 1.0, total_iters=self.warmup_steps)
            self.per_step = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[self.warmup_steps])
        else:
            self.per_step = main
        self.plateau = None
        if cfg.name == "plateau":
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=self.mode, factor=cfg.plateau_factor, patience=cfg.plateau_patience,
                threshold=cfg.plateau_threshold, min_lr=cfg.min_lr,
            )
        self.steps = 0

    def step(self) -> None:
        """After each optimizer step. A plateau schedule only warms up; its reductions come from step_metric."""
        self.steps += 1
        if self.plateau is None or self.steps <= self.warmup_steps:
            self.per_step.step()

    def step_metric(self, value: float) -> None:
        if self.plateau is not None and self.steps >= self.warmup_steps and math.isfinite(value):
            self.plateau.step(value)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "per_step": self.per_step.state_dict(),
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.per_step.load_state_dict(state["per_step"])
        if self.plateau is not None and state["plateau"] is not None:
            self.plateau.load_state_dict(state["plateau"])

    def restart_at_epoch(self, epochs_done: int, state: dict) -> None:
        """Resume a schedule saved under other steps per epoch (train.elastic=adapt): this schedule, restarted and
        advanced to the start of epoch `epochs_done` + 1 in its own steps, so that warm-up, step decays and the cosine
        still end where the epochs say. ReduceLROnPlateau keeps what it learnt: its state, and (past warm-up) the LR
        it had reduced to, as the optimizer's state restored it."""
        reduced = [group["lr"] for group in self.optimizer.param_groups]
        self._build()
        with warnings.catch_warnings():  # stepped ahead of the optimizer on purpose: torch's order warning says nothing
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(epochs_done * self.steps_per_epoch):
                self.step()
        if self.plateau is not None and state["plateau"] is not None:
            self.plateau.load_state_dict(state["plateau"])
            if self.steps >= self.warmup_steps:
                for group, lr in zip(self.optimizer.param_groups, reduced):
                    group["lr"] = lr
