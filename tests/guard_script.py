"""The non-finite guard under DDP, launched on 2 processes by tests/test_speed.py:

    accelerate launch --num_processes 2 tests/guard_script.py OUT_DIR

Each rank trains a short (5-step) and a long (40-step) epoch with the default guard (Run.train_epoch),
counting the collectives called from Python during each, and writes what it saw to OUT_DIR/rank<R>.json.
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
from epoch_parts import tiny_model, tiny_run

from dist_train.job.distributed import unwrap

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
    trained = tiny_model(accelerator)
    for name in COLLECTIVES:
        setattr(dist, name, counting(name))
    seen, step = {}, 0
    for epoch, steps in enumerate((5, 40)):
        run = tiny_run(accelerator, trained, steps, first_step=step, total_steps=45)
        calls.clear()
        run.train_epoch(epoch)
        step = run.state.global_step
        seen[f"collectives_{steps}_steps"] = sorted(calls)
    trained.guard.poll(step)
    weights = b"".join(p.detach().numpy().tobytes() for p in unwrap(accelerator, trained.model).parameters())
    seen.update(via_gradients=trained.guard.via_gradients, skipped=trained.guard.skipped, steps=step,
                finite=all(bool(torch.isfinite(p).all()) for p in trained.model.parameters()),
                weights_sha256=hashlib.sha256(weights).hexdigest())
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(seen))
    # The DDP model (its reducer holds the process group) goes before the group: when the reducer drops the
    # group's last reference, torch 2.11 destroys it holding the GIL and joins gloo's thread, which may be
    # freeing the last collective's tensors and wait for the GIL: a deadlock at exit (1 run in 3 on 2 cores).
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # the accelerator's own references to the model and optimizer
    del trained, run
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    main()
