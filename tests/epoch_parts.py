"""A Run over a tiny model and random tensors, for the tests that look inside an epoch: the host syncs of a
step (tests/test_speed.py) and the collectives of the guard under DDP (tests/guard_script.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from dist_train.config import ModelConfig, OptimConfig, SchedulerConfig, config_from_dict
from dist_train.custom import IndexedDataset
from dist_train.data.datasets import ModelInput
from dist_train.job.layout import Layout
from dist_train.loop.build import Parts
from dist_train.loop.engine import Run
from dist_train.loop.guard import FiniteGuard
from dist_train.models.losses import CrossEntropy
from dist_train.models.networks import build_model
from dist_train.models.optim import Schedule, build_optimizer

BATCH = 4


@dataclass
class Trained:
    """The prepared model, its optimizers and the guard: several Runs may share them (one run, several epochs)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    torch_optimizer: torch.optim.Optimizer
    guard: FiniteGuard


def tiny_model(accelerator: Accelerator, fused: bool = True) -> Trained:
    model = build_model(ModelConfig(width=4), 3, 3, 8)
    torch_optimizer = build_optimizer(OptimConfig(fused=fused), model)
    model, optimizer = accelerator.prepare(model, torch_optimizer)
    guard = FiniteGuard(accelerator, torch_optimizer, "skip", 3,
                        via_gradients=isinstance(model, torch.nn.parallel.DistributedDataParallel))
    return Trained(model, optimizer, torch_optimizer, guard)


def tiny_run(accelerator: Accelerator, trained: Trained, steps: int, *, max_grad_norm: float | None = None,
             log_every: int = 1000, first_step: int = 0, total_steps: int | None = None, pin_memory: bool = False) -> Run:
    """A Run whose epoch is `steps` optimizer steps of batch 4 per process (random 3x8x8 images, 3 classes), logging
    every `log_every` steps, with no step checks (checkpoint.check_every_n_steps beyond the epoch)."""
    config = config_from_dict({}, {"train.max_grad_norm": max_grad_norm, "train.log_every_n_steps": log_every,
                                   "checkpoint.check_every_n_steps": 10**9, "data.num_workers": 0})
    n = steps * BATCH * accelerator.num_processes
    data = IndexedDataset(TensorDataset(torch.randn(n, 3, 8, 8), torch.randint(0, 3, (n,)), torch.arange(n)), "train")
    loader = accelerator.prepare(DataLoader(data, batch_size=BATCH, pin_memory=pin_memory))
    layout = Layout(accelerator.num_processes, BATCH, 1, n)
    schedule = Schedule(SchedulerConfig(), trained.torch_optimizer, layout.steps_per_epoch, total_steps or steps, "max")
    parts = Parts(config=config, layout=layout, model=trained.model, optimizer=trained.optimizer,
                  torch_optimizer=trained.torch_optimizer, train_set=data, train_loader=loader, loss_fn=CrossEntropy(),
                  schedule=schedule, guard=trained.guard,
                  prepare_input=ModelInput(config.data, accelerator.device, False, torch.float32, False))
    run = Run(accelerator, parts)
    run.state.global_step = first_step  # where an earlier epoch of the same run left the step count
    return run
