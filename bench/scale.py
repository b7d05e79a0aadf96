"""Start-up and memory against the size of the training table: launch -> first optimizer step, PSS of the whole job and
the largest process, for tables of 10^4 to 1.42 x 10^7 rows; and the k-fold assignment of such a table.

    python bench/scale.py tables DIR --rows 10000 100000 1281167      # write the tables (JPEGs once, paths repeat)
    python bench/scale.py run DIR --rows 10000 1281167 --processes 1 2 --workers 0 2 --trees /tmp/before .
    python bench/scale.py folds DIR --rows 1281167 --trees /tmp/before .   # 5-fold grouped CV assignment, in-process

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
config = load_config(None, ["data.source=csv", "data.root={data}", "data.train={table}", "data.group_column=group",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tables = sub.add_parser("tables", help="write the JPEGs and the tables")
    tables.add_argument("dir", type=Path)
    tables.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_281_167])
    tables.add_argument("--files", type=int, default=3000)
    tables.add_argument("--classes", type=int, default=10)
    tables.add_argument("--groups", type=int, default=100_000)
    for name, fn in (("run", run), ("folds", folds)):
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
    args = parser.parse_args()
    if args.command == "tables":
        write_tables(args.dir, args.rows, args.files, args.classes, args.groups)
    else:
        args.trees = [t.resolve() for t in args.trees]
        args.dir = args.dir.resolve()
        args.fn(args)


if __name__ == "__main__":
    main()
