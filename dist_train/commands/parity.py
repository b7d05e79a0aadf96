"""`python -m dist_train.commands.parity --config X`: check that 2 processes (and accumulation) train as 1 process does.

Runs a few optimizer steps of your config three ways with the same global batch -- 1 process x 2b,
2 processes x b, and 2 processes x b/2 x accumulation 2 (1 process x b x 2 when b is odd) -- then
prints the effective global batch, optimizer steps per epoch, the LR at every step and the largest
weight difference from the 1-process run, ending with `max_weight_diff=<float>`.
Augmentation and dropout are switched off (their randomness differs between layouts by design).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from dist_train.config import load_config


def _launch(processes: int, args: list[str], env: dict) -> None:
    if processes == 1:
        cmd = [sys.executable, "-m", "dist_train.commands.cli", *args]
    else:
        accelerate = Path(sys.executable).with_name("accelerate")
        cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dist_train.commands.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"parity: `{' '.join(cmd)}` failed with exit code {proc.returncode}")


def _lrs(run_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars("train/lr")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run (default 5)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when GPUs are visible")
    args = parser.parse_intermixed_args(argv)
    config = load_config(args.config, args.overrides)  # fail here, once, on a bad config
    import torch
    from safetensors.torch import load_file

    from dist_train.models.networks import build_model, has_batchnorm

    b = config.data.batch_size
    layouts = [(1, 2 * b, 1), (2, b, 1), (2, b // 2, 2) if b % 2 == 0 else (1, b, 2)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if args.cpu or torch.cuda.device_count() < 2:
        env["CUDA_VISIBLE_DEVICES"] = ""  # 2 processes need 2 GPUs; otherwise compare on CPU (gloo)
    base = [*args.overrides, f"train.max_steps={args.steps}", "train.log_every_n_steps=1", "data.train_augment=[]",
            "model.dropout=0.0", "train.early_stopping_patience=0", "--overwrite"]
    if args.config:
        base = ["--config", args.config, *base]
    runs = []
    with tempfile.TemporaryDirectory(prefix="dist_train_parity_") as tmp:
        for processes, batch, accum in layouts:
            out = Path(tmp) / f"p{processes}_b{batch}_a{accum}"
            print(f"running {processes} process(es) x batch {batch} x accumulation {accum} ...", flush=True)
            _launch(processes, [*base, f"data.batch_size={batch}", f"train.grad_accum_steps={accum}", f"output_dir={out}"], env)
            info = json.loads((out / "run_info.json").read_text())
            weights = load_file(str(out / "checkpoints" / "last" / "model.safetensors"))
            runs.append((processes, batch, accum, info, _lrs(out), weights))

    print(f"\n{'layout':<28}{'global batch':>13}{'steps/epoch':>13}{'max |w - w_1proc|':>20}")
    reference = runs[0][5]
    worst = 0.0
    for processes, batch, accum, info, _, weights in runs:
        # floating tensors only: BatchNorm's num_batches_tracked counts forward passes, which accumulation multiplies
        diff = max((weights[k].double() - reference[k].double()).abs().max().item()
                   for k in reference if reference[k].is_floating_point())
        worst = max(worst, diff)
        layout = f"{processes} proc x {batch} x accum {accum}"
        print(f"{layout:<28}{info['global_batch']:>13}{info['optimizer_steps_per_epoch']:>13}{diff:>20.3g}")
    print("\nLR at each optimizer step:")
    for step, lrs in enumerate(zip(*(r[4] for r in runs)), start=1):
        print(f"  step {step:>3}: " + "  ".join(f"{lr:.6g}" for lr in lrs) + ("" if len(set(lrs)) == 1 else "   <- differs"))
    model = build_model(replace(config.model, pretrained=None, freeze=[]), 2, config.data.channels, config.data.image_size)
    if has_batchnorm(model):
        if not config.model.sync_batchnorm:
            print("note: the model has BatchNorm with per-process statistics; set model.sync_batchnorm=true for parity")
        print("note: BatchNorm normalises each micro-batch, so with accumulation its statistics (and weights) differ by design")
    print(f"max_weight_diff={worst:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
