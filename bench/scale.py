"""Start-up and memory against the size of the training table: launch -> first optimizer step, PSS of the whole job and
the largest process, for tables of 10^4 to 1.42 x 10^7 rows; and the k-fold assignment of such a table.

    python bench/scale.py tables DIR --rows 10000 100000 1281167      # write the tables (JPEGs once, paths repeat)
    python bench/scale.py run DIR --rows 10000 1281167 --processes 1 2 --workers 0 2 --trees /tmp/before .
    python bench/scale.py folds DIR --rows 1281167 --trees /tmp/before .   # 5-fold grouped CV assignment, in-process
    python bench/scale.py workers DIR --rows 10000 1281167 --trees /tmp/before .  # a loader worker's own memory
    python bench/scale.py model                   # save (sealed), resume, soup of a ~200 M-parameter timm model

A table has `--files` distinct 48x48 JPEGs (bench/make_jpegs.py), each path repeated over the rows, unique ids,
`--classes` labels (a row's label is its file's) and `--groups` groups (column `group`, spread over the classes). The
run is the digits config's model on that table (`data.source=csv`, `train.max_steps=1 checkpoint.every_n_steps=1`);
the first step's time is the mtime of the checkpoint saved right after it (as bench/startup.py). While the job runs,
the PSS (proportional set size: a page shared by n processes counts 1/n in each) of every process of the launch --
launcher, ranks, their loader workers and fork servers -- is summed every 0.2 s; the table gives the peak of that sum
and the peak RSS of the largest process. Each tree runs with its own fresh `data.cache_dir` made warm by one untimed
run first where the tree has a table cache (`--cold` times that first run instead). Repeats are interleaved over the
trees.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def table_name(rows: int) -> str:
    return f"train_{rows}.csv"


def write_tables(out: Path, rows: list[int], files: int, classes: int, groups: int, val: int = 1000) -> None:
    """The JPEGs once, then one training table per row count (and val.csv, test.csv over the same files)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    from make_jpegs import make

    make(out, files, classes, (48, 48), val=0)
    images = pacsv.read_csv(out / "train.csv").select(["image", "label"])
    for count in rows:
        path = out / table_name(count)
        if path.is_file():
            continue
        index = np.arange(count)
        pick = pa.array(index % files)
        table = pa.table({
            "id": pc.binary_join_element_wise("r", pc.cast(pa.array(index), pa.string()), ""),
            "image": images["image"].take(pick),
            "label": images["label"].take(pick),
            # groups across classes: row i's group does not follow its file (as a person photographed many times)
            "group": pc.binary_join_element_wise("g", pc.cast(pa.array((index * 7919) % groups), pa.string()), ""),
        })
        tmp = path.with_suffix(".tmp")
        pacsv.write_csv(table, tmp, pacsv.WriteOptions(quoting_style="none"))
        tmp.replace(path)
        print(f"{path}: {count} rows, {path.stat().st_size / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    for name, count in (("scale_val.csv", val), ("scale_test.csv", val)):
        if not (out / name).is_file():
            pick = pa.array(np.arange(count) % files)
            pacsv.write_csv(pa.table({"id": pc.binary_join_element_wise("v", pc.cast(pa.array(np.arange(count)), pa.string()), ""),
                                      "image": images["image"].take(pick), "label": images["label"].take(pick)}),
                            out / name, pacsv.WriteOptions(quoting_style="none"))


class Memory(threading.Thread):
    """Samples the PSS of `pid` and all its descendants every `every` s: the peak of their sum and the peak RSS of one."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.root, self.every, self.psutil = psutil.Process(pid), every, psutil
        self.peak_pss = self.peak_rss = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            total = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except self.psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    info = proc.memory_full_info()
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                    continue
                total += info.pss
                self.peak_rss = max(self.peak_rss, info.rss)
            self.peak_pss = max(self.peak_pss, total)
            self.done.wait(self.every)


def first_step(tree: Path, data: Path, rows: int, processes: int, workers: int, out: Path, cache: Path) -> dict:
    bin_dir = Path(sys.executable).parent
    launch = [str(bin_dir / "accelerate"), "launch", "--config_file", str(tree / "accelerate_config.yaml"),
              "--main_process_port", "0", "--num_processes", str(processes)]
    args = ["--config", str(tree / "configs" / "digits.yaml"), "data.source=csv", f"data.root={data}",
            f"data.train={table_name(rows)}", "data.val=scale_val.csv", "data.test=scale_test.csv", f"data.num_workers={workers}",
            f"output_dir={out}", "train.max_steps=1", "checkpoint.every_n_steps=1", "--overwrite"]
    if (tree / "dist_train" / "data" / "columns.py").is_file():  # a tree with the table cache: its own directory
        args.append(f"data.cache_dir={cache}")
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    started = time.time()
    proc = subprocess.Popen([*launch, str(tree / "train.py"), *args], cwd=tree, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    memory = Memory(proc.pid)
    memory.start()
    output = proc.communicate()[0]
    memory.done.set()
    memory.join()
    if proc.returncode:
        raise SystemExit(f"{tree}: the run failed\n{output[-3000:]}")
    step = (out / "checkpoints" / "step-00000001" / "model.safetensors").stat().st_mtime - started
    return {"first_step_s": step, "pss_gib": memory.peak_pss / 2**30, "largest_rss_gib": memory.peak_rss / 2**30}


def run(args) -> None:
    cases = [(rows, p, w) for rows in args.rows for p in args.processes for w in args.workers]
    results: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        caches = {tree: Path(tmp) / f"cache-{i}" for i, tree in enumerate(args.trees)}
        if not args.cold:
            for rows in args.rows:  # warm each tree's cache with one untimed run per table
                for tree in args.trees:
                    first_step(tree, args.dir, rows, 1, 0, Path(tmp) / "run", caches[tree])
        for repeat in range(args.repeats):
            for case in cases:
                for tree in args.trees:
                    if args.cold:
                        shutil.rmtree(caches[tree], ignore_errors=True)
                    result = first_step(tree, args.dir, *case, Path(tmp) / "run", caches[tree])
                    results.setdefault((str(tree), *case), []).append(result)
                    print(json.dumps({"tree": str(tree), "rows": case[0], "processes": case[1], "workers": case[2],
                                      **result}), flush=True)
    print(f"\n{'tree':<16} {'rows':>10} {'proc':>4} {'work':>4} {'first step s':>13} {'job PSS GiB':>12} {'largest RSS GiB':>16}"
          f"   (median of {args.repeats}{', cold cache' if args.cold else ''})")
    for (tree, rows, p, w), values in results.items():
        med = {k: statistics.median(v[k] for v in values) for k in values[0]}
        print(f"{tree:<16} {rows:>10} {p:>4} {w:>4} {med['first_step_s']:>13.2f} {med['pss_gib']:>12.2f} "
              f"{med['largest_rss_gib']:>16.2f}")


FOLDS_CODE = """
import json, resource, sys, time
from dist_train.config import load_config
from dist_train.models.tasks import load_folds
config = load_config(None, ["data.source=csv", "data.root={data}", "data.train={table}", "data.group_column=group", "data.val=null",
                            "cv.folds=5", "seed=0"{cache}])
started = time.perf_counter()
train, labels, task, folds = load_folds(config)
seconds = time.perf_counter() - started
import hashlib
print(json.dumps({{"seconds": seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "folds_digest": hashlib.sha256(bytes(folds.astype('int8'))).hexdigest()[:16]}}))
"""


def folds(args) -> None:
    """The whole training table read, labelled and assigned to 5 grouped, stratified folds in one process."""
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for repeat in range(args.repeats):
            for rows in args.rows:
                for i, tree in enumerate(args.trees):
                    cache = ""
                    if (tree / "dist_train" / "data" / "columns.py").is_file():
                        cache = f', "data.cache_dir={tmp}/cache-{i}"'
                    code = FOLDS_CODE.format(data=args.dir, table=table_name(rows), cache=cache)
                    proc = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True,
                                          env={**os.environ, "PYTHONPATH": str(tree)})
                    if proc.returncode:
                        raise SystemExit(proc.stderr[-3000:])
                    print(json.dumps({"tree": str(tree), "rows": rows, **json.loads(proc.stdout.splitlines()[-1])}), flush=True)


WORKERS_CODE = """
import json, sys, time
import psutil
from dist_train.config import load_config
from dist_train.models.tasks import load_task
from dist_train.data.datasets import build_dataset
from dist_train.data.loaders import build_loader
config = load_config("configs/digits.yaml", ["data.source=csv", "data.root={data}", "data.train={table}",
                     "data.val=scale_val.csv", "data.num_workers=2", "data.worker_start=forkserver"{cache}])
train, val, labels, task = load_task(config)
loader = build_loader(build_dataset(train, config.data, "train", 0), config.data, train=True, seed=0)
batches = iter(loader)
for _ in range(8):
    next(batches)
time.sleep(1)
workers = [p for p in psutil.Process().children(recursive=True) if p.pid in {{w.pid for w in batches._workers}}]
info = [w.memory_full_info() for w in workers]
print(json.dumps({{"worker_uss_mib": [round(i.uss / 2**20) for i in info], "worker_pss_mib": [round(i.pss / 2**20) for i in info],
                  "rank_uss_mib": round(psutil.Process().memory_full_info().uss / 2**20)}}))
"""


def workers(args) -> None:
    """One rank's loader workers (2, from the fork server) after 8 batches: their private memory (USS) and PSS."""
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for rows in args.rows:
            for i, tree in enumerate(args.trees):
                cache = ""
                if (tree / "dist_train" / "data" / "columns.py").is_file():
                    cache = f', "data.cache_dir={tmp}/cache-{i}"'
                    first_step(tree, args.dir, rows, 1, 0, Path(tmp) / "run", Path(tmp) / f"cache-{i}")  # warm
                code = WORKERS_CODE.format(data=args.dir, table=table_name(rows), cache=cache)
                proc = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True,
                                      env={**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"})
                if proc.returncode:
                    raise SystemExit(proc.stderr[-3000:])
                print(json.dumps({"tree": str(tree), "rows": rows, **json.loads(proc.stdout.splitlines()[-1])}), flush=True)


PLAIN_SAVE = """
import json, resource, sys, time, timm, torch
from safetensors.torch import save_file
model = timm.create_model("{model}", num_classes=10, in_chans=1)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
model(torch.randn(2, 1, 32, 32)).sum().backward()
optimizer.step()
out = {{}}
started = time.perf_counter()
torch.save({{"model": model.state_dict(), "optimizer": optimizer.state_dict()}}, sys.argv[1] + "/plain.pt")
out["torch.save model+optimizer s"] = time.perf_counter() - started
started = time.perf_counter()
save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, sys.argv[1] + "/plain.safetensors")
out["safetensors model s"] = time.perf_counter() - started
out["parameters"] = sum(p.numel() for p in model.parameters())
out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps(out))
"""


def _timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float, str]:
    """(seconds, peak RSS GiB of the process, its output) of one command, through /usr/bin/time -v."""
    started = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    rss = next(int(line.split()[-1]) for line in proc.stderr.splitlines() if "Maximum resident set size" in line)
    return time.monotonic() - started, rss / 2**20, proc.stdout + proc.stderr


def _save_seconds(checkpoint: Path) -> float:
    """From the first file written to the manifest that seals it (files' mtimes)."""
    times = [p.stat().st_mtime for p in checkpoint.iterdir() if p.is_file()]
    return (checkpoint / "manifest.json").stat().st_mtime - min(times)


def model_row(args) -> None:
    """A ~200 M-parameter timm model: 3 cross-validation folds of one optimizer step each (each saves a sealed
    checkpoint), a resume of fold 0 for one more step, `dist-train soup` of the 3 folds; and the plain torch.save /
    safetensors.save_file of the same model and optimizer state."""
    from dist_train.data.digits import materialize_digits

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        digits = tmp / "digits"
        materialize_digits(digits)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
        plain = subprocess.run([sys.executable, "-c", PLAIN_SAVE.format(model=args.model), str(tmp)], capture_output=True,
                               text=True, env=env, check=True)
        print(json.dumps({"plain": json.loads(plain.stdout.splitlines()[-1])}), flush=True)
        common = ["--config", str(ROOT / "configs" / "digits.yaml"), f"data.root={digits}", f"model.name=timm/{args.model}",
                  "data.image_size=32", "data.batch_size=2", "data.num_workers=0", "data.val=null", "cv.folds=3",
                  "train.max_steps=1", "checkpoint.every_n_steps=1", "tracking.images=false", f"output_dir={tmp / 'cv'}"]
        seconds, rss, _ = _timed([sys.executable, str(ROOT / "train.py"), *common], ROOT, env)
        saves = [_save_seconds(next((tmp / "cv" / f"fold-{k}" / "checkpoints").glob("step-*"))) for k in range(3)]
        sizes = [sum(p.stat().st_size for p in next((tmp / "cv" / f"fold-{k}" / "checkpoints").glob("step-*")).iterdir())
                 for k in range(3)]
        print(json.dumps({"cv_3_folds": {"seconds": seconds, "peak_rss_gib": rss, "save_seconds": saves,
                                         "checkpoint_gib": [s / 2**30 for s in sizes]}}), flush=True)
        single = [a for a in common if not a.startswith(("cv.", "train.max_steps", "output_dir"))] + [f"output_dir={tmp / 'run'}"]
        seconds, rss, _ = _timed([sys.executable, str(ROOT / "train.py"), *single, "train.max_steps=1"], ROOT, env)
        print(json.dumps({"train_1_step": {"seconds": seconds, "peak_rss_gib": rss}}), flush=True)
        seconds, rss, said = _timed([sys.executable, str(ROOT / "train.py"), *single, "train.max_steps=2", "--resume", "auto"],
                                    ROOT, env)
        assert (tmp / "run" / "checkpoints" / "step-00000002").is_dir() and "resumed from" in said, said[-2000:]
        print(json.dumps({"resume_then_1_step": {"seconds": seconds, "peak_rss_gib": rss}}), flush=True)
        seconds, rss, _ = _timed([str(Path(sys.executable).parent / "dist-train"), "soup", "--checkpoint",
                                  str(tmp / "cv"), "--output", str(tmp / "soup")], ROOT, env)
        print(json.dumps({"soup_3_folds": {"seconds": seconds, "peak_rss_gib": rss}}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tables = sub.add_parser("tables", help="write the JPEGs and the tables")
    tables.add_argument("dir", type=Path)
    tables.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_281_167])
    tables.add_argument("--files", type=int, default=3000)
    tables.add_argument("--classes", type=int, default=10)
    tables.add_argument("--groups", type=int, default=100_000)
    for name, fn in (("run", run), ("folds", folds), ("workers", workers)):
        p = sub.add_parser(name)
        p.set_defaults(fn=fn)
        p.add_argument("dir", type=Path)
        p.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_281_167])
        p.add_argument("--trees", type=Path, nargs="+", default=[ROOT])
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--tmp", help="where the runs and caches go (default: the system's temp directory)")
        if name == "run":
            p.add_argument("--processes", type=int, nargs="+", default=[2])
            p.add_argument("--workers", type=int, nargs="+", default=[2])
            p.add_argument("--cold", action="store_true", help="time the first run on each table (its cache built)")
    model = sub.add_parser("model", help="checkpoint save, resume and soup of a ~200 M-parameter timm model")
    model.set_defaults(fn=model_row)
    model.add_argument("--model", default="convnext_large")
    model.add_argument("--tmp")
    args = parser.parse_args()
    if args.command == "model":
        args.fn(args)
    elif args.command == "tables":
        write_tables(args.dir, args.rows, args.files, args.classes, args.groups)
    else:
        args.trees = [t.resolve() for t in args.trees]
        args.dir = args.dir.resolve()
        args.fn(args)


if __name__ == "__main__":
    main()
