"""A model's weights whole and on CPU on every rank (gathered under ZeRO-3), and a digest of any state: equal digests
mean bitwise-equal weights or optimizer states, across ranks, runs and checkpoints."""
from __future__ import annotations

import hashlib

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from dist_train.job.distributed import unwrap


def state_digest(value) -> str:
    """sha256 over the tensors and numbers of a nested state (a model's or an optimizer's state_dict), keys
    in order: equal digests mean bitwise-equal states."""
    digest = hashlib.sha256()

    def walk(node) -> None:
        if isinstance(node, torch.Tensor):
            digest.update(node.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(node, dict):
            for key in sorted(node, key=str):
                digest.update(str(key).encode())
                walk(node[key])
        elif isinstance(node, (list, tuple)):
            for item in node:
                walk(item)
        else:
            digest.update(repr(node).encode())

    walk(value)
    return digest.hexdigest()


def full_state_dict(accelerator: Accelerator, model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, whole and on CPU, on every rank. Under ZeRO-3 this is a collective:
    the partitioned parameters are gathered, so all ranks must call it."""
    module = unwrap(accelerator, model)
    plugin = accelerator.state.deepspeed_plugin
    if accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
