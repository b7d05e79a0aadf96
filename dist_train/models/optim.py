"""Optimizers with weight-decay parameter groups, and LR schedules counted in optimizer steps."""
from __future__ import annotations

import fnmatch
import math
import warnings

import torch
from torch import nn

from dist_train.config import OptimConfig, SchedulerConfig
from dist_train.errors import ConfigError


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool,
                 layer_decay: float | None = None) -> list[dict]:
    """Trainable parameters split so that biases and normalisation weights (1-D tensors), and what the model names
    in no_weight_decay() (timm's position embeddings, class tokens), skip decay; with `layer_decay`, also by layer
    (layer_decay_groups). Frozen parameters are in no group."""
    skip = () if decay_norm_and_bias else tuple(getattr(model, "no_weight_decay", set)())
    if layer_decay is not None:
        return layer_decay_groups(model, weight_decay, decay_norm_and_bias, layer_decay, skip)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if decay_norm_and_bias or (param.ndim > 1 and not _matches(name, skip)) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def layer_decay_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool, layer_decay: float,
                       skip: tuple[str, ...] = ()) -> list[dict]:
    """timm's param_groups_layer_decay: layers numbered from the input (the model's group_matcher), the last one
    (the head) at lr_scale 1 and layer i of n at layer_decay ** (n - 1 - i); each layer split by weight decay as
    param_groups does. Each group gets a `name` (layerNN) for the logs; build_optimizer applies the lr_scale."""
    from timm.models import group_parameters
    from timm.optim import param_groups_layer_decay

    if not hasattr(model, "group_matcher"):
        raise ConfigError(f"optim.layer_decay: {type(model).__name__} does not name its layers (no group_matcher(), "
                          f"which timm's models have); use a timm/<name> model or optim.layer_decay=null")
    groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip,
                                      weight_decay_exclude_1d=not decay_norm_and_bias, layer_decay=layer_decay)
    # the same numbering timm's function used, to name each group by its layer
    layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    last = max(layer_of.values())
    names = {id(param): name for name, param in model.named_parameters()}
    for group in groups:
        group["name"] = f"layer{layer_of.get(names[id(group['params'][0])], last):02d}"
    return groups


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)  # timm's no_weight_decay() may hold wildcards


def build_optimizer(cfg: OptimConfig, model: nn.Module, fused: bool = True) -> torch.optim.Optimizer:
    """`fused`: the default when optim.fused is None (fused kernels unless DeepSpeed runs the optimizer)."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias, cfg.layer_decay)
    for group in groups:
        if "lr_scale" in group:  # the schedulers then scale each group's own initial LR
            group["lr"] = cfg.lr * group["lr_scale"]
    kernels = {"fused": True} if (cfg.fused if cfg.fused is not None else fused) else {"foreach": None}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **kernels)
    optimizer_class = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return optimizer_class(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kernels)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The LR of each layer group (optim.layer_decay), as `lr_group/<name>`; {} when all groups follow optim.lr."""
    return {f"lr_group/{group['name']}": group["lr"] for group in optimizer.param_groups if "lr_scale" in group}


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
        """The LR that optim.lr follows (layer groups run at their lr_scale times it: group_lrs)."""
        return max(self.optimizer.param_groups, key=lambda group: group.get("lr_scale", 1.0))["lr"]

    def group_lrs(self) -> dict[str, float]:
        return group_lrs(self.optimizer)

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
