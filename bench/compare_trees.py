"""Does a change keep training bit for bit? Runs the same digits configurations with two checkouts' train.py and
compares what they ended with: each rank's final weights and optimizer digests (run_info.json), metrics.jsonl
(timings left out) and the last checkpoint's trainer_state.json. For refactorings of the loop:

    git worktree add /tmp/before <commit> --detach
    python bench/compare_trees.py /tmp/before .            # every case; or name some: ... ddp2 accum

Prints one line per case (`=` or `DIFF` per item, then what differs); exit code 1 if anything differs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TIMINGS = {"samples_per_sec", "epoch_seconds", "data_wait_fraction"}
CASES = {  # name: (processes, overrides)
    "ddp2": (2, []),
    "accum": (2, ["train.grad_accum_steps=2", "data.batch_size=16"]),
    "ema_mix": (2, ["train.ema_decay=0.9", "data.mixup_alpha=0.4", "data.cutmix_alpha=1.0"]),
    "plateau_es": (1, ["scheduler.name=plateau", "train.early_stopping_patience=1", "train.epochs=4", "optim.lr=0.3"]),
    "maxsteps_every": (2, ["train.max_steps=30", "checkpoint.every_n_steps=7", "train.epochs=3"]),
    "syncbn_ignore": (2, ["model.sync_batchnorm=true", "train.nonfinite=ignore", "train.max_grad_norm=null"]),
    # the data layer's splits and targets: a stratified hold-out, a grouped one, a grouped cv fold, the balanced sampler,
    # float targets (grouped.csv: the digits' training table with a group column, written beside them)
    "holdout_balanced": (2, ["data.val=null", "data.balanced_sampler=true"]),
    "grouped_holdout": (1, ["data.train=grouped.csv", "data.val=null", "data.group_column=group"]),
    "cv_grouped_fold": (2, ["data.train=grouped.csv", "data.val=null", "data.group_column=group", "cv.folds=3", "cv.fold=1"]),
    "regression": (1, ["data.source=csv", "task.kind=regression", "task.targets=[label]", "checkpoint.monitor=val_loss", "checkpoint.mode=min",
                       "loss.label_smoothing=0"]),
}


def write_grouped(digits: Path) -> None:
    """digits/grouped.csv: the training table with a `group` column (37 groups, each spread over the classes)."""
    import csv

    rows = list(csv.DictReader(open(digits / "train.csv", newline="")))
    with open(digits / "grouped.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "group"])
        writer.writeheader()
        writer.writerows({**row, "group": f"g{i * 7 % 37}"} for i, row in enumerate(rows))


def run(tree: Path, out: Path, data: Path, processes: int, overrides: list[str]) -> dict:
    args = ["--config", str(tree / "configs" / "digits.yaml"), f"data.root={data}", "data.image_size=8",
            "data.num_workers=0", "data.train_augment=[]", "train.epochs=2", "train.log_every_n_steps=1",
            f"output_dir={out}", "--overwrite", *overrides]
    bin_dir = Path(sys.executable).parent
    launch = [str(bin_dir / "accelerate"), "launch", "--config_file", str(tree / "accelerate_config.yaml"),
              "--num_processes", str(processes)] if processes > 1 else [sys.executable]
    proc = subprocess.run([*launch, str(tree / "train.py"), *args], cwd=tree, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"{tree}: train.py failed:\n{proc.stderr[-3000:]}")
    if "cv.fold=" in " ".join(overrides):  # one fold's run: train.py puts it in the fold's directory
        out = next(out.glob("fold-*"), out)
    info = json.loads((out / "run_info.json").read_text())
    return {
        "weights": info["final_weights_sha256_per_rank"],
        "optimizer": info["final_optimizer_sha256_per_rank"],
        "metrics": [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
                    for line in (out / "metrics.jsonl").read_text().splitlines()],
        "trainer_state": json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text()),
    }


def differences(a, b) -> str:
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(isinstance(x, dict) for x in a + b):
        return "; ".join(differences(x, y) for x, y in zip(a, b) if x != y)
    if isinstance(a, dict) and isinstance(b, dict):
        return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k))
    return f"{a!r} vs {b!r}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"some of: {', '.join(CASES)} (default: all)")
    args = parser.parse_args()
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; the cases: {', '.join(CASES)}")
    work = Path(tempfile.mkdtemp(prefix="compare_trees-"))
    sys.path.insert(0, str(args.after.resolve()))
    from dist_train.data.digits import materialize_digits
    materialize_digits(work / "digits")
    write_grouped(work / "digits")
    same = True
    for name in args.cases or CASES:
        processes, overrides = CASES[name]
        ends = [run(tree.resolve(), work / f"{name}-{i}", work / "digits", processes, overrides)
                for i, tree in enumerate((args.before, args.after))]
        verdicts = {key: ends[0][key] == ends[1][key] for key in ends[0]}
        same &= all(verdicts.values())
        print(f"{name}: " + " ".join(f"{key} {'=' if ok else 'DIFF'}" for key, ok in verdicts.items()), flush=True)
        for key, ok in verdicts.items():
            if not ok:
                print(f"    {key}: {differences(ends[0][key], ends[1][key])[:1500]}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
