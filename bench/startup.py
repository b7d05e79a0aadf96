"""Time from `accelerate launch ... train.py --config configs/digits.yaml` to the first optimizer step, on 1 and 2
processes (the digits config as shipped: 2 loader workers from the fork server, its model and batch), and of what
the launch is made of: importing the training path in one process, starting the fork server.

    python bench/startup.py                       # 5 interleaved repeats of each case of this checkout
    python bench/startup.py --trees /tmp/before . # the same cases for two checkouts, interleaved (before/after)

The first optimizer step is read from disk: the run saves a checkpoint after step 1 (checkpoint.every_n_steps=1,
train.max_steps=1), and its model.safetensors' mtime is when that save began, right after the step (the save's
finite-weights check and a barrier come before it, milliseconds here). Prints a table of min / median / max seconds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def first_step_seconds(tree: Path, processes: int, data: Path, out: Path) -> float:
    bin_dir = Path(sys.executable).parent
    launch = [str(bin_dir / "accelerate"), "launch", "--config_file", str(tree / "accelerate_config.yaml"),
              "--num_processes", str(processes)]
    args = ["--config", str(tree / "configs" / "digits.yaml"), f"data.root={data}", f"output_dir={out}",
            "train.max_steps=1", "checkpoint.every_n_steps=1", "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.time()
    proc = subprocess.run([*launch, str(tree / "train.py"), *args], cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{tree}: the run failed\n{proc.stderr[-3000:]}")
    return (out / "checkpoints" / "step-00000001" / "model.safetensors").stat().st_mtime - started


def import_seconds(tree: Path) -> float:
    """One process importing what train.py imports before it trains (the loop), from a cold interpreter."""
    code = "import time; t = time.time(); import dist_train.commands.cli, dist_train.loop.trainer; print(time.time() - t)"
    if not (tree / "dist_train" / "loop").is_dir():  # a checkout from before the subpackages
        code = code.replace("dist_train.commands.cli, dist_train.loop.trainer", "dist_train.cli, dist_train.trainer")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                          capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", nargs="+", type=Path, default=[ROOT])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from dist_train.data.digits import materialize_digits

    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "digits"
        materialize_digits(data)
        for repeat in range(args.repeats):
            for tree in args.trees:  # interleaved: a slow minute of the machine hits every tree alike
                times.setdefault((str(tree), "import"), []).append(import_seconds(tree.resolve()))
                for processes in args.processes:
                    seconds = first_step_seconds(tree.resolve(), processes, data, Path(tmp) / f"run-{processes}")
                    times.setdefault((str(tree), f"first step, {processes} process(es)"), []).append(seconds)
            print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    print(f"{'tree':<24} {'what':<28} {'min':>6} {'median':>7} {'max':>6}  (seconds, {args.repeats} repeats)")
    for (tree, what), values in times.items():
        print(f"{tree:<24} {what:<28} {min(values):6.2f} {statistics.median(values):7.2f} {max(values):6.2f}")


if __name__ == "__main__":
    main()
