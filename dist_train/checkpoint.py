"""Checkpoints: `last` and `best` directories written completely before they replace the old ones; resume."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import save_file

from dist_train.errors import CheckpointError

WEIGHTS_FILE = "model.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
SCHEDULE_FILE = "schedule.pt"


@dataclass
class TrainerState:
    """Where the run is and what it has decided so far; saved beside the model in every checkpoint."""

    epoch: int = 0
    """Epochs completed."""
    global_step: int = 0
    """Optimizer steps taken."""
    best_metric: float | None = None
    best_epoch: int | None = None
    evals_without_improvement: int = 0
    history: list[dict] = field(default_factory=list)
    """Per epoch: what each rank saw (batches, samples) — the run's own record of its sharding."""

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def save_checkpoint(
    accelerator: Accelerator, model, directory: Path, schedule, trainer_state: TrainerState, config_yaml: str
) -> None:
    """Write the full training state into `directory`, replacing what was there only once complete.

    Every rank calls this (Accelerate writes each rank's RNG state, and DeepSpeed shards are saved by
    all ranks); the model, optimizer and metadata files are written by the main process only.
    """
    tmp = directory.parent / f".tmp-{directory.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed saves its own (sharded) engine checkpoint; inference wants one plain weights file.
        weights = full_state_dict(accelerator, model)
        if accelerator.is_main_process:
            save_file(weights, str(tmp / WEIGHTS_FILE))
    if accelerator.is_main_process:
        torch.save(schedule.state_dict(), tmp / SCHEDULE_FILE)
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state.state_dict(), indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
        replace_dir(tmp, directory)
    accelerator.wait_for_everyone()


def full_state_dict(accelerator: Accelerator, model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, whole and on CPU, on every rank. Under ZeRO-3 this is a collective:
    the partitioned parameters are gathered, so all ranks must call it."""
    module = accelerator.unwrap_model(model)
    plugin = accelerator.state.deepspeed_plugin
    if accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def copy_checkpoint(accelerator: Accelerator, source: Path, directory: Path) -> None:
    """`best` as a copy of the `last` just written, swapped in only once complete."""
    if accelerator.is_main_process:
        tmp = directory.parent / f".tmp-{directory.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        replace_dir(tmp, directory)
    accelerator.wait_for_everyone()


def replace_dir(new: Path, target: Path) -> None:
    old = target.parent / f".old-{target.name}"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def resolve_resume(resume: str, output_dir: Path) -> Path:
    """`auto`: the run's `checkpoints/last`; else the given directory, which must be a checkpoint."""
    path = output_dir / "checkpoints" / "last" if resume == "auto" else Path(resume)
    if not (path / TRAINER_STATE_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"--resume {resume}: {path} is not a complete checkpoint (no {TRAINER_STATE_FILE} / {WEIGHTS_FILE})")
    return path


def load_checkpoint(accelerator: Accelerator, directory: Path, schedule, trainer_state: TrainerState) -> None:
    """Restore model, optimizer, RNGs (Accelerate, weights-only loads), schedule and trainer state."""
    accelerator.load_state(str(directory))
    schedule.load_state_dict(torch.load(directory / SCHEDULE_FILE, map_location="cpu", weights_only=True))
    trainer_state.load_state_dict(json.loads((directory / TRAINER_STATE_FILE).read_text()))
