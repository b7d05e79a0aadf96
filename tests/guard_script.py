"""The non-finite guard under DDP, launched on 2 processes by tests/test_speed.py:

    accelerate launch --num_processes 2 tests/guard_script.py OUT_DIR

Each rank runs train_one_epoch (with the default guard) for a short and a long epoch, counting the
collectives called from Python during each, and writes what it saw to OUT_DIR/rank<R>.json.
DIST_TRAIN_FAULT (e.g. nanloss@step:3#1) makes one rank's loss NaN.
"""
import gc
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset

from dist_train.config import ModelConfig, OptimConfig, SchedulerConfig
from dist_train.engine import FiniteGuard, train_one_epoch
from dist_train.losses import CrossEntropy
from dist_train.models import build_model
from dist_train.optim import Schedule, build_optimizer

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "barrier", "all_gather_object")
calls = []


def counting(name):
    real = getattr(dist, name)

    def call(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    return call


def main() -> None:
    out = Path(sys.argv[1])
    accelerator = Accelerator(cpu=True)
    set_seed(0)
    model = build_model(ModelConfig(width=4), 3, 3, 8)
    torch_optimizer = build_optimizer(OptimConfig(fused=True), model)
    n = 40 * 4 * accelerator.num_processes
    data = TensorDataset(torch.randn(n, 3, 8, 8), torch.randint(0, 3, (n,)), torch.arange(n))
    model, optimizer, loader = accelerator.prepare(model, torch_optimizer, DataLoader(data, batch_size=4))
    guard = FiniteGuard(accelerator, torch_optimizer, "skip", 3, kept=lambda: "",
                        via_gradients=isinstance(model, torch.nn.parallel.DistributedDataParallel))
    for name in COLLECTIVES:
        setattr(dist, name, counting(name))
    seen, step = {}, 0
    for epoch, steps in ((1, 5), (2, 40)):
        schedule = Schedule(SchedulerConfig(), torch_optimizer, steps, 45, "max")
        calls.clear()
        _, step = train_one_epoch(accelerator, model, loader, CrossEntropy(), optimizer, schedule, batch_size=4,
                                  dataset_len=n, grad_accum_steps=1, max_grad_norm=None, log_every_n_steps=1000,
                                  global_step=step, log=lambda values, at: None, epoch=epoch, num_batches=40,
                                  on_step=lambda done, at, steps=steps: done >= steps, guard=guard)
        seen[f"collectives_{steps}_steps"] = sorted(calls)
    guard.poll(step)
    weights = b"".join(p.detach().numpy().tobytes() for p in accelerator.unwrap_model(model).parameters())
    seen.update(via_gradients=guard.via_gradients, skipped=guard.skipped, steps=step,
                finite=all(bool(torch.isfinite(p).all()) for p in model.parameters()),
                weights_sha256=hashlib.sha256(weights).hexdigest())
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(seen))
    # The DDP model (its reducer holds the process group) goes before the group: when the reducer drops the
    # group's last reference, torch 2.11 destroys it holding the GIL and joins gloo's thread, which may be
    # freeing the last collective's tensors and wait for the GIL: a deadlock at exit (1 run in 3 on 2 cores).
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # the accelerator's own references to the model and optimizer
    del model, optimizer, loader, guard
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    main()
