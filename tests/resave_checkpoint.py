"""Load a checkpoint of a 2-process run into today's parts (rank 0's view, in one process) and save it again in
today's format, then say which of its states came back bit for bit. For the old-checkpoint test in
tests/test_checkpoint.py: what is portable across CPUs is that a checkpoint loads into exactly the state it holds,
not the arithmetic that produced it.

    python tests/resave_checkpoint.py CHECKPOINT OUTPUT_DIR CONFIG [key=value ...]

OUTPUT_DIR/checkpoints/step-N receives the checkpoint written by today's Checkpointer (rank 1's RNG file copied
from CHECKPOINT: this one process is rank 0); prints one JSON line {part: equal?}.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from dist_train.config import load_config
from dist_train.job.distributed import build_accelerator, unwrap
from dist_train.loop.build import build_parts
from dist_train.loop.engine import Run
from dist_train.rundir import checkpoint as ckpt
from dist_train.rundir.weights import state_digest


def same(a, b) -> bool:
    return state_digest(a) == state_digest(b)


def load_pickle(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)  # Accelerate's RNG states (a trusted fixture)


def main(source: Path, output_dir: Path, config_file: str, overrides: list[str]) -> dict:
    config = load_config(config_file, [*overrides, f"output_dir={output_dir}"])
    accelerator = build_accelerator(seed=config.seed, project_dir=str(output_dir))
    run = Run(accelerator, build_parts(accelerator, config))
    saved = ckpt.saved_state(source)
    # rank 0 of the run that saved it: its layout, so the mid-epoch position keeps its meaning
    run.state.layout = run.checkpointer.layout = saved["layout"]
    run.checkpointer.directory = output_dir / "checkpoints"
    run.checkpointer.resume(source)
    parts = run.parts
    loaded = {
        "model": same(unwrap(accelerator, parts.model).state_dict(), load_file(str(source / ckpt.WEIGHTS_FILE))),
        "ema": same(parts.ema.state_dict()["module"], load_file(str(source / ckpt.EMA_FILE))),
        "optimizer": same(parts.torch_optimizer.state_dict(), torch.load(source / "optimizer.bin", weights_only=True)),
        "schedule": same(parts.schedule.state_dict(), torch.load(source / ckpt.SCHEDULE_FILE, weights_only=True)),
        "torch_rng": same(torch.get_rng_state(), load_pickle(source / "random_states_0.pkl")["torch_manual_seed"]),
        "position": {k: v for k, v in run.state.state_dict().items() if k != "layout"}
        == {k: saved[k] for k in run.state.state_dict() if k != "layout"},
    }
    written = run.checkpointer.save()
    shutil.copy2(source / "random_states_1.pkl", written / "random_states_1.pkl")
    ckpt.write_manifest(written, saved["global_step"])
    resaved = {
        "resaved_model": same(load_file(str(written / ckpt.WEIGHTS_FILE)), load_file(str(source / ckpt.WEIGHTS_FILE))),
        "resaved_ema": same(load_file(str(written / ckpt.EMA_FILE)), load_file(str(source / ckpt.EMA_FILE))),
        "resaved_optimizer": same(torch.load(written / "optimizer.bin", weights_only=True),
                                  torch.load(source / "optimizer.bin", weights_only=True)),
        "resaved_schedule": same(torch.load(written / ckpt.SCHEDULE_FILE, weights_only=True),
                                 torch.load(source / ckpt.SCHEDULE_FILE, weights_only=True)),
        "resaved_rng": same(load_pickle(written / "random_states_0.pkl"), load_pickle(source / "random_states_0.pkl")),
        "resaved_trainer_state": ckpt.saved_state(written) == saved,
    }
    return {**loaded, **resaved, "written": str(written)}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:])))
