"""Checkpoints that cannot be lost or poisoned: complete-then-rename saves with a sha256 manifest, rotation, resume.

Layout under <output_dir>/checkpoints/:
    step-00000040/      one complete checkpoint (manifest.json written last, then the directory renamed)
    last -> step-...    symlinks, swapped atomically once the target is complete
    best -> step-...
    .tmp-step-...       a save in progress; removed at the next start if the job died during it
Rotation keeps the newest `keep_last` checkpoints and `best`, deleting only after the new one is complete.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from safetensors.torch import load_file, save_file

from dist_train.errors import CheckpointError
from dist_train.job import faults
from dist_train.job.distributed import any_rank, same_on_all_ranks, unwrap
from dist_train.job.faults import is_peer_failure
from dist_train.models.ema import ModelEMA
from dist_train.models.networks import pickled_globals
from dist_train.rundir.files import write_text_atomic
from dist_train.rundir.weights import full_state_dict

WEIGHTS_FILE = "model.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
SCHEDULE_FILE = "schedule.pt"
MANIFEST_FILE = "manifest.json"
CLASSES_FILE = "classes.json"
EMA_FILE = "ema.safetensors"
TRAINER_STATE_ORDER = ("epoch", "batches_done", "global_step", "best_metric", "best_epoch", "best_checkpoint",
                       "evals_without_improvement", "skipped_steps", "bad_steps_in_a_row", "skipped_samples",
                       "epoch_totals", "ema_updates", "layout", "history")
# Globals a checkpoint's pickles may name: torch tensors/storages, numpy arrays (RNG state), plain
# containers, and three DeepSpeed state classes. Anything else (os.system, builtins.eval, ...) is refused.
SAFE_GLOBALS = (
    "torch.", "collections.OrderedDict", "_codecs.encode", "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype", "numpy.dtypes.",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Resumable:
    """What a checkpoint restores besides Accelerate's model, optimizer and per-rank RNG states, each part
    through its own state_dict. trainer_state.json holds one flat mapping of the JSON parts (the run's
    position and decisions, the guard's counters, the EMA's update count); the schedule goes to schedule.pt
    and the EMA's weights to ema.safetensors."""

    run: Stateful
    schedule: Stateful
    guard: Stateful
    ema: ModelEMA | None = None


def checkpoint_name(global_step: int) -> str:
    return f"step-{global_step:08d}"


class Checkpointer:
    """Saves a run as `checkpoints/step-N` (complete, sealed, then renamed; `last`/`best` swapped after; old ones
    rotated) and resumes it, bitwise (choose_checkpoint picks which). Every rank calls save() and resume():
    Accelerate writes each rank's RNG state and DeepSpeed's shards are saved by all ranks; the other files are
    written by the main process only. `layout`: this run's [processes, batch, accumulation].

    The collectives of a save, in order: [ZeRO-3: gather the whole weights], agree that the weights are finite,
    barrier (the temporary directory exists), [DeepSpeed: its own], gather every rank's write error, agree that
    the main process sealed it. Non-finite weights are never written; a save that fails on any rank (disk full,
    unwritable, a file-size limit) raises the same CheckpointError on every rank and leaves the previous
    checkpoints intact.
    """

    def __init__(self, accelerator: Accelerator, directory: Path, model, resumable: Resumable, *, layout: list[int],
                 config_yaml: str, classes: list[str] | dict, keep_last: int = 2):
        self.accelerator, self.directory, self.model, self.resumable = accelerator, directory, model, resumable
        self.layout, self.config_yaml, self.classes, self.keep_last = layout, config_yaml, classes, keep_last

    def describe_last(self) -> str:
        return describe_last(self.directory)

    # --- save -----------------------------------------------------------------------------------

    def save(self, best: bool = False) -> Path:
        """Write the full training state as `step-N` (N: the run's optimizer steps), point `last` (and `best`,
        when `best`) at it, rotate; returns its path."""
        accelerator = self.accelerator
        trainer_state = self._trainer_state()
        step = trainer_state["global_step"]
        final, tmp = self.directory / checkpoint_name(step), self.directory / f".tmp-{checkpoint_name(step)}"
        weights = full_state_dict(accelerator, self.model) if accelerator.distributed_type == DistributedType.DEEPSPEED else None
        tensors = weights.values() if weights is not None else unwrap(accelerator, self.model).state_dict().values()
        (bad,) = any_rank(accelerator, not all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()))
        if bad:
            raise CheckpointError(f"refusing to save non-finite weights at step {step}; "
                                  f"the last checkpoint written ({self.describe_last()}) is intact")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        error = self._write(tmp, weights, trainer_state)
        # every rank's files are in (or some rank failed) before the manifest seals them
        errors = [e for e in gather_object([error]) if e]
        if errors:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"cannot write checkpoint {final} ({'; '.join(errors)}); "
                                  f"the previous checkpoint ({self.describe_last()}) is intact")
        error = self._seal(tmp, final, step, best) if accelerator.is_main_process else None
        (failed,) = any_rank(accelerator, error is not None)
        if failed:
            raise CheckpointError(f"{error or 'the main process could not seal the checkpoint'}; "
                                  f"the previous checkpoint ({self.describe_last()}) is intact")
        return final

    def _trainer_state(self) -> dict:
        """trainer_state.json: the run's state, the guard's counters and the EMA's update count, keys in the order
        of the first checkpoints."""
        ema = self.resumable.ema
        state = {**self.resumable.run.state_dict(), **self.resumable.guard.state_dict(),
                 "ema_updates": ema.updates if ema is not None else 0}
        return {**{k: state.pop(k) for k in TRAINER_STATE_ORDER if k in state}, **state}

    def _write(self, tmp: Path, weights: dict | None, trainer_state: dict) -> str | None:
        """This rank's files of the checkpoint in `tmp`; returns what went wrong, if anything."""
        try:
            self.accelerator.save_state(str(tmp), safe_serialization=True)
            if self.accelerator.is_main_process:
                if weights is not None:  # DeepSpeed saves its own (sharded) engine state; inference wants one plain file
                    save_file(weights, str(tmp / WEIGHTS_FILE))
                torch.save(self.resumable.schedule.state_dict(), tmp / SCHEDULE_FILE)
                if self.resumable.ema is not None:
                    average = self.resumable.ema.state_dict()["module"]
                    save_file({k: v.detach().cpu().contiguous() for k, v in average.items()}, str(tmp / EMA_FILE))
                (tmp / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
                (tmp / "config.yaml").write_text(self.config_yaml)
                (tmp / CLASSES_FILE).write_text(json.dumps(self.classes))
            faults.inject(f"save-written:{trainer_state['global_step']}")
        except Exception as exc:  # OSError, or torch/safetensors wrapping one (ENOSPC, EFBIG, EACCES)
            if is_peer_failure(exc):
                raise
            return f"rank {self.accelerator.process_index}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
        return None

    def _seal(self, tmp: Path, final: Path, step: int, best: bool) -> str | None:
        """The main process: manifest, rename into place, links, rotation; returns what went wrong, if anything."""
        try:
            write_manifest(tmp, step)
            faults.inject(f"save-sealed:{step}")
            if final.exists():  # the same step saved again (e.g. preemption right after a periodic save)
                _remove(final)
            os.rename(tmp, final)
            fsync_dir(self.directory)
            faults.inject(f"save-renamed:{step}")
            point(self.directory / "last", final.name)
            if best:
                point(self.directory / "best", final.name)
            faults.inject(f"save-linked:{step}")
            rotate(self.directory, self.keep_last, step)
        except OSError as exc:
            return f"cannot seal checkpoint {final}: {exc.strerror or exc}"
        return None

    # --- resume ---------------------------------------------------------------------------------

    def resume(self, directory: Path, rescale: bool = False) -> None:
        """Restore model, optimizer, RNGs (Accelerate, weights-only loads) and every Resumable part from checkpoint
        `directory` (chosen and verified by choose_checkpoint). `rescale` (train.elastic=adapt): the checkpoint counted
        its steps under another global batch; the schedule restarts at its epoch in this run's steps."""
        accelerator = self.accelerator
        saved = saved_state(directory)
        layout = saved.get("layout") or self.layout
        if saved.get("batches_done") and math.prod(layout) != math.prod(self.layout):  # elastic.plan refuses it first
            raise CheckpointError(f"{directory} was saved in the middle of an epoch by [processes, batch, accumulation] "
                                  f"= {layout}; this run has {self.layout}, whose global batch differs: the rest of the "
                                  f"epoch would be other batches")
        if not (directory / f"random_states_{accelerator.process_index}.pkl").is_file():  # Accelerate would skip it silently
            print(f"rank {accelerator.process_index}: {directory} holds no RNG state for this rank (it was saved by "
                  f"{saved.get('layout', ['?'])[0]} processes): its random numbers restart from the seed", flush=True)
        try:
            accelerator.load_state(str(directory))
            schedule = torch.load(directory / SCHEDULE_FILE, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"checkpoint {directory}: refused to load ({str(exc).splitlines()[0]})") from None
        if rescale:
            self.resumable.schedule.restart_at_epoch(saved["epoch"], schedule)
        else:
            self.resumable.schedule.load_state_dict(schedule)
        self.resumable.run.load_state_dict(saved)
        self.resumable.guard.load_state_dict(saved)
        if self.resumable.ema is not None:
            self._load_ema(directory, saved)
        if accelerator.is_main_process:
            repair_after_resume(self.directory.parent, saved["global_step"], saved.get("best_checkpoint"))

    def _load_ema(self, directory: Path, saved: dict) -> None:
        """The moving average saved beside the model (the checkpoint was verified already)."""
        if not (directory / EMA_FILE).is_file():
            raise CheckpointError(f"{directory} has no {EMA_FILE}: it was saved without train.ema_decay; resume without it, "
                                  f"or start a new run")
        ema = self.resumable.ema
        weights = load_file(str(directory / EMA_FILE), device=str(next(ema.module.parameters()).device))
        ema.load_state_dict({"module": weights, "updates": saved.get("ema_updates", 0)})


def choose_checkpoint(accelerator: Accelerator, resume: str, checkpoints: Path) -> Path | None:
    """The checkpoint to resume from ("auto": the newest intact one in `checkpoints`, else the directory given),
    chosen and verified (sha256 of every file) once, by the main process, and agreed by every rank. None: "auto"
    and no complete checkpoint yet -- a requeued job that died before its first save starts from the beginning."""
    choice = None
    if accelerator.is_main_process:
        try:
            if resume == "auto" and not complete_checkpoints(checkpoints):
                print(f"no checkpoint in {checkpoints} yet: starting the run from the beginning", flush=True)
                choice = ("none", "")
            else:
                choice = ("ok", str(resolve_resume(resume, checkpoints, log=lambda m: print(m, flush=True))))
        except CheckpointError as exc:
            choice = ("error", str(exc))
    kind, value = same_on_all_ranks(accelerator, choice)
    if kind == "error":
        raise CheckpointError(value)
    return Path(value) if kind == "ok" else None


def saved_state(directory: Path) -> dict:
    """A checkpoint's trainer_state.json (the run's position, layout and decisions)."""
    return json.loads((directory / TRAINER_STATE_FILE).read_text())


def epoch_boundary_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint saved at the end of an epoch (any layout may resume it)."""
    for directory in complete_checkpoints(checkpoints):
        try:
            if not saved_state(directory).get("batches_done"):
                return directory
        except (OSError, ValueError):
            continue
    return None


def describe_last(checkpoints: Path) -> str:
    """The newest complete checkpoint in `checkpoints`, for messages."""
    found = complete_checkpoints(checkpoints)
    return str(found[0]) if found else "none yet"


def write_manifest(directory: Path, step: int | None = None) -> None:
    """sha256 and size of every file, fsynced, then manifest.json itself: its presence marks the save complete."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        files[str(path.relative_to(directory))] = {"sha256": sha256(path), "bytes": path.stat().st_size}
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    faults.inject(f"save-fsynced:{step}")
    tmp = directory / f".{MANIFEST_FILE}.tmp"
    with open(tmp, "w") as f:
        json.dump({"format": 1, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, directory / MANIFEST_FILE)
    fsync_dir(directory)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def point(link: Path, target: str) -> None:
    """Atomically make `link` a symlink to `target` (a sibling name)."""
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Sealed checkpoint directories, newest (highest step) first."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.glob("step-*") if p.is_dir() and not p.is_symlink() and (p / MANIFEST_FILE).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def rotate(checkpoints: Path, keep_last: int, step: int | None = None) -> None:
    """Delete checkpoints beyond the newest `keep_last` (never `last` or `best`): each is first renamed to a
    temporary name, so a crash in the middle leaves a `.tmp-` directory for the next start to clean, never
    a half-deleted checkpoint that looks complete."""
    keep = {p.name for p in complete_checkpoints(checkpoints)[:keep_last]}
    for link in ("last", "best"):
        if (checkpoints / link).is_symlink():
            keep.add(os.readlink(checkpoints / link))
    for path in sorted(checkpoints.glob("step-*")):
        if path.name not in keep:
            doomed = path.with_name(f".tmp-delete-{path.name}")
            os.rename(path, doomed)
            faults.inject(f"save-rotating:{step}")
            shutil.rmtree(doomed, ignore_errors=True)


def _remove(path: Path) -> None:
    doomed = path.with_name(f".tmp-delete-{path.name}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def clean_stale(checkpoints: Path) -> list[str]:
    """Remove what a job that died while saving left behind (temporaries, half-swapped links); returns their names."""
    removed = []
    if checkpoints.is_dir():
        for path in sorted(checkpoints.glob(".tmp-*")) + sorted(checkpoints.glob(".*.tmp")):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()
            removed.append(path.name)
        for path in checkpoints.glob("step-*"):  # a directory renamed into place is always sealed; anything else is not ours
            if path.is_dir() and not (path / MANIFEST_FILE).is_file():
                _remove(path)
                removed.append(path.name)
    return removed


def verify(directory: Path, only: list[str] | None = None) -> None:
    """Raise CheckpointError naming the first missing, truncated or altered file, or an unsafe pickle
    (`only`: check just these files of the manifest)."""
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory} is not a complete checkpoint (no {MANIFEST_FILE})")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{manifest_path} is unreadable ({exc})") from None
    for name, entry in files.items():
        if only is not None and name not in only:
            continue
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory}: file {name} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"checkpoint {directory}: file {name} is truncated or altered "
                                  f"({path.stat().st_size} bytes, expected {entry['bytes']})")
        if sha256(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {directory}: file {name} is corrupt (sha256 mismatch)")
    for path in directory.rglob("*"):
        if path.suffix in (".pt", ".bin", ".pkl") and path.is_file() and (only is None or path.name in only):
            unsafe = unsafe_globals(path)
            if unsafe:
                raise CheckpointError(f"checkpoint {directory}: {path.name} would import {', '.join(unsafe)}; refused to load")


def unsafe_globals(path: Path) -> list[str]:
    return pickled_globals(path, allowed=SAFE_GLOBALS)


def resolve_resume(resume: str, checkpoints: Path, log=print) -> Path:
    """`auto`: the newest checkpoint that verifies (saying which were skipped and why); else the given one. An
    error when there is none (choose_checkpoint starts a run that has no complete checkpoint yet)."""
    if resume != "auto":
        path = Path(resume)
        verify(path)
        return path.resolve()
    candidates = complete_checkpoints(checkpoints)
    if not candidates:
        raise CheckpointError(f"--resume auto: no complete checkpoint in {checkpoints}")
    for i, path in enumerate(candidates):
        try:
            verify(path)
            return path
        except CheckpointError as exc:
            older = "falling back to an older checkpoint" if i + 1 < len(candidates) else "no older one to fall back to"
            log(f"warning: {exc}; {older}")
    # never "start afresh" here: that would delete them, and what is damaged may still be worth a look
    names = ", ".join(p.name for p in candidates)
    raise CheckpointError(f"--resume auto: no checkpoint in {checkpoints} is intact ({names}: the warnings above say "
                          f"why); nothing was deleted. Start the run afresh with --overwrite (it deletes them), or "
                          f"choose another output_dir=...")


def repair_after_resume(output_dir: Path, step: int, best_checkpoint: str | None) -> None:
    """Undo what a run killed after its last checkpoint (at `step`) left behind: metrics past that step, a stale
    `best` link."""
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file():
        kept = [line for line in metrics.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        write_text_atomic(metrics, "".join(line + "\n" for line in kept))
    checkpoints = output_dir / "checkpoints"
    if best_checkpoint and (checkpoints / best_checkpoint).is_dir() and \
            (checkpoints / "best").resolve() != (checkpoints / best_checkpoint).resolve():
        point(checkpoints / "best", best_checkpoint)
