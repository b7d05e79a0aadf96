"""Build the Accelerator (single device, DDP over NCCL or gloo), refuse unsharded launches, rank helpers."""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
from accelerate.utils import broadcast_object_list

from dist_train.errors import ConfigError, DistributedSetupError

LAUNCH_HINT = (
    "on a machine without GPU start several processes with "
    "`accelerate launch --config_file accelerate_config.yaml --num_processes N train.py ...` "
    "(or `accelerate launch --multi_gpu --num_processes N ...`)"
)


def build_accelerator(
    *,
    seed: int,
    mixed_precision: str = "no",
    grad_accum_steps: int = 1,
    project_dir: str | None = None,
    log_with: str | None = None,
    timeout_s: int = 600,
) -> Accelerator:
    """An Accelerator on the GPU when there is one, else on the CPU with gloo, checked to be sharded."""
    on_gpu = torch.cuda.is_available()
    if mixed_precision == "fp16" and not on_gpu:
        raise ConfigError("train.mixed_precision=fp16 needs a GPU; use bf16 (or no) on CPU")
    accelerator = Accelerator(
        # Without `cpu=True` Accelerate 1.x on a GPU-less machine reports DistributedType.NO and
        # num_processes == 1 even when the launcher started several processes: every rank would
        # silently train on all the data.
        cpu=not on_gpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum_steps,
        log_with=log_with,
        project_dir=project_dir,
        # The shuffle of epoch e is a function of (seed, e) only: identical on every rank, on resume too.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))],
    )
    check_world_size(accelerator)
    return accelerator


def check_world_size(accelerator: Accelerator) -> None:
    """Refuse to run when the processes that exist disagree with what Accelerate will shard over."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    dist_world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if env_world != accelerator.num_processes or dist_world != accelerator.num_processes:
        raise DistributedSetupError(
            f"{env_world} processes were launched (torch.distributed world size {dist_world}) but Accelerate "
            f"shards data over {accelerator.num_processes} ({accelerator.distributed_type}); every process "
            f"would train on all the data. {LAUNCH_HINT}"
        )
    asked = launcher_requested_processes()
    if asked is not None and asked > 1 and accelerator.num_processes == 1:
        raise DistributedSetupError(f"`accelerate launch --num_processes {asked}` started 1 process; {LAUNCH_HINT}")


def launcher_requested_processes(pid: int | None = None) -> int | None:
    """`--num_processes N` from the command line of the `accelerate launch` that started us, if any.

    Accelerate's launcher falls back to a single process when no GPU is visible and no multi-process
    mode is chosen, with no warning; this lets us say so instead of training one process silently.
    """
    pid = os.getppid() if pid is None else pid
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in argv if a]
    if "launch" not in args or not any("accelerate" in a for a in args[:3]):
        return None
    for i, arg in enumerate(args):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(args) and args[i + 1].isdigit():
                return int(args[i + 1])
            if arg.startswith(flag + "=") and arg.split("=", 1)[1].isdigit():
                return int(arg.split("=", 1)[1])
    return None


def same_on_all_ranks(accelerator: Accelerator, value):
    """The main process's `value` on every rank: decisions (best, early stop, plateau) cannot diverge."""
    if accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def main_print(accelerator: Accelerator, *args, **kwargs) -> None:
    """Print from the main process only, flushed (logs of launched jobs are often piped)."""
    if accelerator.is_main_process:
        print(*args, **kwargs, flush=True)


def is_main_process_env() -> bool:
    """Rank 0 (or no launcher) judged from the environment, before any Accelerator exists."""
    return os.environ.get("RANK", "0") == "0"


def fail(message: str, code: int = 2) -> None:
    """One line on stderr from one process, then exit: bad input is not worth a traceback per rank."""
    if is_main_process_env():
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
