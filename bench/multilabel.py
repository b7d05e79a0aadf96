"""The multi-label worked example: what each choice of decision thresholds scores on held-out rows.

    python bench/multilabel.py [--root data/multilabel] [--runs runs/multilabel-bench] [--processes 2]

On the synthetic digit tiles (python -m dist_train.data.synthetic multilabel), with configs/multilabel.yaml as it is:
  hold-out   one model trained on train.csv, validated on val.csv: thresholds 0.5, or tuned on val.csv (its best epoch)
  cv         5-fold cross-validation of train.csv, the folds' average: thresholds 0.5, or tuned on the OOF predictions
each predicting info.csv (the held-out rows: no run saw them), scored against test_labels.csv: macro mAP (of the
probabilities: the thresholds do not change it), sample-F1 and macro-F1 (of the submitted label sets). The in-run
scores (validation, out-of-fold: nested and in-sample) are printed beside them.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, f1_score

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, args: list[str], processes: int) -> None:
    if processes == 1:
        command = [sys.executable, str(ROOT / script), *args]
    else:
        command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                   str(ROOT / "accelerate_config.yaml"), "--num_processes", str(processes), str(ROOT / script), *args]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(f"  {script} {' '.join(a for a in args if not a.startswith('data.root'))}: {time.perf_counter() - started:.0f} s",
          flush=True)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def score(submission: Path, truth: Path, classes: list[str]) -> dict:
    answers = {r["id"]: set(r["labels"].split()) for r in rows(truth)}
    predicted = rows(submission)
    y = np.array([[c in answers[r["id"]] for c in classes] for r in predicted], dtype=int)
    chosen = np.array([[c in r["labels"].split() for c in classes] for r in predicted], dtype=int)
    p = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in predicted])
    return {"rows": len(predicted), "map_macro": average_precision_score(y, p, average="macro"),
            "f1_samples": f1_score(y, chosen, average="samples", zero_division=1),
            "f1_macro": f1_score(y, chosen, average="macro", zero_division=0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/multilabel")
    parser.add_argument("--runs", default="runs/multilabel-bench")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    from dist_train.data.synthetic import write_multilabel

    root, runs = Path(write_multilabel(args.root)), Path(args.runs)
    config = ["--config", "configs/multilabel.yaml", f"data.root={root}"]
    holdout, cv = runs / "holdout", runs / "cv"
    print("training", flush=True)
    run("train.py", [*config, "cv.folds=0", "data.val=val.csv", f"output_dir={holdout}", "--overwrite"], args.processes)
    run("train.py", [*config, f"output_dir={cv}", "--overwrite"], args.processes)
    print("predicting info.csv", flush=True)
    submissions = {}
    for name, checkpoint, threshold in [("hold-out, 0.5", holdout, "0.5"), ("hold-out, tuned on val.csv", holdout, "tune"),
                                        ("5-fold ensemble, 0.5", cv, "0.5"), ("5-fold ensemble, tuned on OOF", cv, "tune")]:
        output = runs / f"{checkpoint.name}-{threshold}.csv"
        run("predict.py", ["--checkpoint", str(checkpoint), "--output", str(output), f"data.root={root}",
                           f"task.threshold={threshold}", "inference.probabilities=true"], args.processes)
        submissions[name] = output
    classes = json.loads((holdout / "checkpoints" / "best" / "classes.json").read_text())["multilabel"]
    print(f"\nheld-out rows ({root / 'info.csv'}, scored against {root / 'test_labels.csv'}):")
    print(f"| {'thresholds':<30} | {'mAP (macro)':>11} | {'sample-F1':>9} | {'macro-F1':>8} |")
    print(f"|{'-' * 32}|{'-' * 12}:|{'-' * 10}:|{'-' * 9}:|")
    for name, path in submissions.items():
        s = score(path, root / "test_labels.csv", classes)
        print(f"| {name:<30} | {s['map_macro']:>11.4f} | {s['f1_samples']:>9.4f} | {s['f1_macro']:>8.4f} |")
    best = json.loads((holdout / "run_info.json").read_text())["best"]
    last = [json.loads(line) for line in (holdout / "metrics.jsonl").read_text().splitlines()][best["epoch"] - 1]
    summary = json.loads((cv / "cv_summary.json").read_text())
    print("\nin-run scores (what the runs said of themselves):")
    print(f"  hold-out, val.csv at thresholds tuned on val.csv: sample-F1 {last['val_f1_samples']:.4f}, macro-F1 "
          f"{last['val_f1_macro']:.4f}, mAP {last['val_map_macro']:.4f}")
    for key, what in (("oof", "nested: each fold at the other folds' thresholds"),
                      ("oof_thresholds_in_sample", "in-sample: at the thresholds tuned on all of it")):
        print(f"  cv, OOF {what}: sample-F1 {summary[key]['val_f1_samples']:.4f}, macro-F1 {summary[key]['val_f1_macro']:.4f}, "
              f"mAP {summary[key]['val_map_macro']:.4f}")


if __name__ == "__main__":
    main()
