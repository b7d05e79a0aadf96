"""The two ways to ship a cross-validated competition model as one ONNX file, measured: the folds' ensemble in one graph
(best score, k times the cost) against one network (the folds' soup, or a student distilled from the ensemble).

    python bench/export_choices.py train [--root data/masks] [--runs runs/export-bench] [--processes 2]
    python bench/export_choices.py measure [--root data/masks] [--runs runs/export-bench] [--threads 1]

train: on the mask-shaped set (python -m dist_train.data.synthetic masks), configs/masks.yaml as it is -- the 5-fold
cross-validation (runs/.../cv), its soup (dist-train soup), a student distilled from the 5 folds (a 20% grouped hold-out,
distill.teacher=<cv>) -- then `dist-train export` of each (the CV directory: one graph of the 5 folds).
measure: for each .onnx, its size, onnxruntime's latency on the CPU (one image per call: median of 200 calls after 20
warm-up calls; and images/s in batches of 64), and the score of its own outputs on the 2,100 test photos (the
submission made from the ONNX file's argmax, scored by `synthetic score` against the answers).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(command: list[str]) -> None:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(f"  {' '.join(command[-6:])}: {time.perf_counter() - started:.0f} s", flush=True)


def launch(script: str, args: list[str], processes: int) -> None:
    prefix = ([sys.executable] if processes == 1 else
              [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(ROOT / "accelerate_config.yaml"),
               "--num_processes", str(processes)])
    run([*prefix, str(ROOT / script), *args])


def train(root: Path, runs: Path, processes: int) -> None:
    from dist_train.data.synthetic import write_masks

    write_masks(root)
    config = ["--config", "configs/masks.yaml", f"data.root={root}"]
    launch("train.py", [*config, f"output_dir={runs / 'cv'}", "--overwrite"], processes)
    dist_train = str(Path(sys.executable).with_name("dist-train"))
    run([dist_train, "soup", "--checkpoint", str(runs / "cv"), "--output", str(runs / "soup"), "--overwrite"])
    launch("train.py", [*config, "cv.folds=0", "data.val_fraction=0.2", f"distill.teacher={runs / 'cv'}",
                        f"output_dir={runs / 'student'}", "--overwrite"], processes)
    for name in ("cv", "soup", "student"):
        run([dist_train, "export", "--checkpoint", str(runs / name), "--output", str(runs / "onnx" / f"{name}.onnx")])


def test_images(root: Path, runs: Path):
    """The test photos as the models see them (the evaluation transform of the run's config), and their ids."""
    import torch

    from dist_train.config import load_config
    from dist_train.data.datasets import build_dataset
    from dist_train.data.splits import load_test_records

    config = load_config(runs / "cv" / "config.yaml", [f"data.root={root}", "cv.folds=0", "data.num_workers=0"])
    records = load_test_records(config.data)
    dataset = build_dataset(records, config.data, "test", config.seed)
    return torch.stack([dataset[i][0] for i in range(len(dataset))]).numpy(), list(records.ids), config


def measure(root: Path, runs: Path, threads: int) -> None:
    import numpy as np
    import onnxruntime

    from dist_train.data.synthetic import score_masks

    images, ids, config = test_images(root, runs)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    rows = []
    for name, what in (("cv", "5-fold ensemble, one graph"), ("soup", "fold soup"), ("student", "distilled student")):
        path = runs / "onnx" / f"{name}.onnx"
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outputs = np.concatenate([session.run(["logits"], {"images": images[i:i + 256]})[0] for i in range(0, len(images), 256)])
        submission = runs / "onnx" / f"{name}.csv"
        with open(submission, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([config.inference.id_column, config.inference.label_column])
            writer.writerows(zip(ids, outputs.argmax(1).tolist()))
        score = score_masks(root, submission)
        for i in range(20):
            session.run(["logits"], {"images": images[i:i + 1]})
        single = []
        for i in range(200):
            started = time.perf_counter()
            session.run(["logits"], {"images": images[i:i + 1]})
            single.append(time.perf_counter() - started)
        started = time.perf_counter()
        for i in range(0, len(images) - 63, 64):
            session.run(["logits"], {"images": images[i:i + 64]})
        batched = (len(images) // 64 * 64) / (time.perf_counter() - started)
        info = json.loads(path.with_suffix(".json").read_text())
        rows.append((what, path.stat().st_size / 2**20, statistics.median(single) * 1e3, batched, score["accuracy"],
                     score["f1_macro"], info["check"]["max_abs_logit_difference"]))
    print(f"\n{len(images)} test photos, onnxruntime {onnxruntime.__version__} on the CPU, {threads} thread(s):")
    print("| export | size (MB) | ms / image (batch 1) | images/s (batch 64) | test accuracy | test macro-F1 | max logit difference vs PyTorch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for what, size, ms, per_second, accuracy, f1, difference in rows:
        print(f"| {what} | {size:.2f} | {ms:.3f} | {per_second:,.0f} | {accuracy:.4f} | {f1:.4f} | {difference:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["train", "measure"])
    parser.add_argument("--root", default="data/masks")
    parser.add_argument("--runs", default="runs/export-bench")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.step == "train":
        train(Path(args.root), Path(args.runs), args.processes)
    else:
        measure(Path(args.root), Path(args.runs), args.threads)


if __name__ == "__main__":
    main()
