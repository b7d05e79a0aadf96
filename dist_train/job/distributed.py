"""Build the Accelerator (single device, DDP over NCCL or gloo), refuse unsharded launches, rank helpers."""
from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
from accelerate.utils import DistributedType, TorchDynamoPlugin, broadcast_object_list

from dist_train.config import DeepSpeedConfig
from dist_train.errors import ConfigError, DistributedSetupError, DistTrainError
from dist_train.job.faults import say_stopping
from dist_train.job.layout import Layout

COLLECTIVE_TIMEOUT_MARGIN_S = 60
BACKEND_ENV = "DIST_TRAIN_BACKEND"
"""The process-group backend instead of Accelerate's choice (nccl on GPUs, gloo on CPUs): a diagnostic
switch, e.g. gloo for two processes sharing one GPU. It changes how ranks talk, not what they compute."""
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
    compile: bool = False,
    deepspeed: DeepSpeedConfig | None = None,
    batch_size: int | None = None,
    max_grad_norm: float | None = None,
) -> Accelerator:
    """An Accelerator on the GPU when there is one, else on the CPU with gloo, checked to be sharded.

    With `deepspeed.enabled`, a DeepSpeed ZeRO engine (on CPU too, over gloo).
    """
    on_gpu = torch.cuda.is_available()
    if mixed_precision == "fp16" and not on_gpu:
        raise ConfigError("train.mixed_precision=fp16 needs a GPU; use bf16 (or no) on CPU")
    use_deepspeed = deepspeed is not None and deepspeed.enabled
    plugin = None
    if use_deepspeed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if "LOCAL_RANK" not in os.environ:
            raise ConfigError("deepspeed.enabled=true needs a launcher: accelerate launch --config_file "
                              "accelerate_config.yaml --num_processes N train.py ... (even for N=1)")
        plugin = deepspeed_plugin(deepspeed, batch_size, grad_accum_steps, max_grad_norm, mixed_precision, world)
    # The hang watchdog (faults.Watchdog) fires after timeout_s and names the hung rank; the collectives'
    # own timeout comes later, as a backstop.
    process_group = {"timeout": timedelta(seconds=timeout_s + COLLECTIVE_TIMEOUT_MARGIN_S)}
    if use_deepspeed and not on_gpu:
        # Accelerate 1.15 finds no backend for DeepSpeed without a GPU and then reports a single
        # process on every rank (unsharded data); `cpu=True` would drop DeepSpeed. Naming gloo fixes both.
        process_group["backend"] = "gloo"
    backend = os.environ.get(BACKEND_ENV)
    if backend:
        if backend not in ("nccl", "gloo"):
            raise ConfigError(f"{BACKEND_ENV}={backend!r}: choose nccl or gloo (or leave it unset)")
        if backend == "nccl" and not on_gpu:
            raise ConfigError(f"{BACKEND_ENV}=nccl needs a GPU; without one the processes join over gloo")
        # gloo over CUDA tensors: several processes on one GPU, which NCCL refuses ("Duplicate GPU detected")
        process_group["backend"] = backend
    accelerator = Accelerator(
        # Without `cpu=True` Accelerate 1.x on a GPU-less machine reports DistributedType.NO and
        # num_processes == 1 even when the launcher started several processes: every rank would
        # silently train on all the data.
        cpu=not on_gpu and not use_deepspeed,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum_steps,
        deepspeed_plugin=plugin,
        log_with=log_with,
        project_dir=project_dir,
        # The shuffle of epoch e is a function of (seed, e) only: identical on every rank, on resume too.
        # non_blocking: host-to-device copies from pinned memory overlap the previous step's compute.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed, non_blocking=True),
        # torch.compile applied by prepare(), after the DDP wrap (so DDP's bucketed all-reduce still overlaps).
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if compile else None,
        kwargs_handlers=[InitProcessGroupKwargs(**process_group)],
    )
    check_world_size(accelerator)
    if use_deepspeed and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise DistributedSetupError(f"DeepSpeed was asked for but Accelerate set up {accelerator.distributed_type}")
    return accelerator


def deepspeed_plugin(cfg: DeepSpeedConfig, batch_size: int | None, accum: int, max_grad_norm: float | None,
                     mixed_precision: str, world: int):
    """The DeepSpeed config dist_train runs with: the user's JSON (if any) with our batch/accumulation/clipping."""
    try:
        import deepspeed  # noqa: F401
        import transformers  # noqa: F401  (Accelerate's DeepSpeed path imports it)
        from accelerate.utils import DeepSpeedPlugin
    except ImportError as exc:
        raise ConfigError(f"deepspeed.enabled=true but {exc.name} is not installed: "
                          f"pip install -c constraints.txt '.[deepspeed]'") from None
    ours = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": max_grad_norm if max_grad_norm is not None else 0.0,
        "train_batch_size": Layout(world, batch_size, accum).global_batch,
    }
    config: dict = {"zero_optimization": {"stage": cfg.zero_stage}}
    if cfg.config_file:
        path = Path(cfg.config_file)
        if not path.is_file():
            raise ConfigError(f"deepspeed.config_file not found: {path}")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"deepspeed.config_file {path}: {exc}") from None
        for key, value in ours.items():
            if config.get(key, "auto") not in ("auto", value):
                raise ConfigError(f"deepspeed.config_file {path}: {key}={config[key]!r} disagrees with dist_train's "
                                  f"{value!r} (set it to \"auto\" or change the dist_train config)")
    config.update(ours)
    zero = config.setdefault("zero_optimization", {})
    zero.setdefault("stage", cfg.zero_stage)
    # ZeRO-3 keeps parameters partitioned; gather them whole when a checkpoint's weights are written.
    zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    config["bf16"] = {**config.get("bf16", {}), "enabled": mixed_precision == "bf16"}
    config["fp16"] = {**config.get("fp16", {}), "enabled": mixed_precision == "fp16"}
    return DeepSpeedPlugin(hf_ds_config=config)


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
    return requested_processes([a.decode(errors="replace") for a in argv if a])


def requested_processes(args: list[str]) -> int | None:
    """`--num_processes N` of an accelerate launch command line (`accelerate launch ...` or
    `python -m accelerate.commands.launch ...`); None for any other command."""
    by_script = "launch" in args and any("accelerate" in a for a in args[:3])
    by_module = "accelerate.commands.launch" in args[:3]
    if not (by_script or by_module):
        return None
    for i, arg in enumerate(args):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(args) and args[i + 1].isdigit():
                return int(args[i + 1])
            if arg.startswith(flag + "=") and arg.split("=", 1)[1].isdigit():
                return int(arg.split("=", 1)[1])
    return None


def unwrap(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The module inside `model`'s wrappers (torch.compile, DDP; DeepSpeed's engine), the wrappers left as they are.

    Accelerate's unwrap_model imports DeepSpeed whenever it is installed, which on a CPU machine prints DeepSpeed's
    "Setting accelerator to CPU" into every plain DDP run, and by default it hands back a compiled model's wrapper;
    so outside DeepSpeed runs the two wrappers are stripped here.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.unwrap_model(model, keep_torch_compile=False)
    module = getattr(model, "_orig_mod", model)
    while isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        module = module.module
    return module


def broadcast_buffers(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, as DDP does before each forward.

    DeepSpeed keeps parameters in step but leaves buffers per rank: without this, each rank would
    validate a model of its own and the saved weights (rank 0's) would not be the ones evaluated.
    Under DDP the last training step of an epoch leaves each rank its own batch's statistics until the
    next forward: a run that validates the EMA (never forwarding the model again) would end with
    different buffers on each rank.
    """
    if accelerator.num_processes == 1:
        return
    for buffer in unwrap(accelerator, model).buffers():
        torch.distributed.broadcast(buffer.data, src=0)


def any_rank(accelerator: Accelerator, *flags: bool) -> list[bool]:
    """For each flag, whether it is set on at least one rank: one all-reduce, the same answer everywhere."""
    values = torch.tensor([float(f) for f in flags], device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(values)
    return [v > 0 for v in values.tolist()]


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


def say_main(text: str) -> None:
    """Print from the main process only, flushed, before or between runs (no Accelerator: the launcher's RANK)."""
    if is_main_process_env():
        print(text, flush=True)


def is_main_process_env() -> bool:
    """Rank 0 (or no launcher) judged from the environment, before any Accelerator exists."""
    return os.environ.get("RANK", "0") == "0"


def fail(exc: DistTrainError, code: int = 2) -> None:
    """One line on stderr, then exit: bad input is not worth a traceback per rank.

    An error every rank raised alike is printed by rank 0 alone; one raised on a single rank (a bad
    image, out of memory) is printed by that rank, which then exits at once so that its peers, waiting
    for it in a collective, stop too.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        say_stopping()  # the other ranks must not take this one for lost
    if exc.rank_local and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        print(f"error: rank {os.environ.get('RANK', '0')}: {exc.message()}", file=sys.stderr, flush=True)
        os._exit(code)
    if is_main_process_env():
        print(f"error: {exc.message()}", file=sys.stderr, flush=True)
    sys.exit(code)


def forget_process_group() -> None:
    """End this process's group and Accelerate's record of it, so that the next fit or predict starts afresh.

    fit() destroys its process group at the end (accelerator.end_training), but Accelerate's shared state
    still describes it: the next Accelerator in this process (predict after fit) would find no group. And
    torch names a new default group as the first was named ("0"), so under torchrun, whose agent's store
    outlives the group, the new one would read the old one's rendezvous keys and wait forever for peers
    at stale addresses: each generation's groups get names of their own.
    """
    import torch
    from accelerate.state import AcceleratorState, GradientState
    from torch.distributed import distributed_c10d

    global _generation
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    _generation += 1
    distributed_c10d._world.group_count = 1000 * _generation


_generation = 0
"""How many fit/predict calls this process has made: their process groups' names start at 1000 x this."""
