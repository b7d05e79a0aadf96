"""litdata against dist_train's shard sets, on the same photo-like JPEGs (what docs/how-to/shards.md's choice rests on):

  write   seconds to pack the training split's files: litdata.optimize (the bytes as they are, 64 MB chunks, 2
          workers) and `dist-train shards` (8 MB shards, 2 workers)
  read    images/s of one process reading every sample's bytes once in its training order (no decoding): litdata's
          StreamingDataset (shuffle=True) and dist_train's ShardReader in ShardWindowSampler order
  order   whether the first epoch's sample order is the same with 0 and with 2 loader workers (litdata's
          StreamingDataLoader; dist_train's order is the sampler's, which no worker count touches)

litdata is not one of dist_train's dependencies: run this with a Python that has both, e.g.

    python -m venv /tmp/litenv && /tmp/litenv/bin/pip install litdata==0.2.76 pyarrow==26.0.1
    PYTHONPATH=. /tmp/litenv/bin/python bench/shard_libraries.py --data /tmp/dist_train-bench-shards/jpegs-10000-160x120
(dist_train's own reader is imported from this checkout; its shards are written by .venv/bin/dist-train.)
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def read_file(path: str) -> dict:
    with open(path, "rb") as f:
        return {"image": f.read(), "id": Path(path).stem}  # (a "path" ending in .jpg would be stored decoded)


def paths(items: list[dict]) -> list[str]:
    return [item["id"] for item in items]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a bench/make_jpegs.py set")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dist_train-bench-libraries"))
    args = parser.parse_args()
    import litdata
    from litdata import StreamingDataLoader, StreamingDataset

    from dist_train.data.shards import ShardReader, ShardSet, ShardWindowSampler

    with open(args.data / "train.csv") as f:
        files = [str(args.data / row["image"]) for row in csv.DictReader(f)]
    result = {"images": len(files), "litdata": litdata.__version__}
    subprocess.run(["rm", "-rf", str(args.work)], check=True)
    started = time.perf_counter()
    litdata.optimize(fn=read_file, inputs=files, output_dir=str(args.work / "litdata"), chunk_bytes="64MB", num_workers=2)
    result["write_litdata_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    command = ROOT / ".venv" / "bin" / "dist-train"  # (the project's environment: this one need only have litdata)
    subprocess.run([str(command) if command.is_file() else sys.executable, *([] if command.is_file() else ["-m", "dist_train"]),
                    "shards", "--split", "train", "--output", str(args.work / "ours"),
                    "--shard-size", "8", "--workers", "2", "data.source=csv", f"data.root={args.data}", "data.val=null"],
                   check=True, capture_output=True)
    result["write_dist_train_s"] = round(time.perf_counter() - started, 1)

    dataset = StreamingDataset(str(args.work / "litdata"), shuffle=True, seed=0)
    started = time.perf_counter()
    count = sum(1 for _ in dataset)
    result["read_litdata_per_s"] = round(count / (time.perf_counter() - started))
    reader = ShardReader(ShardSet.open(str(args.work / "ours")), args.work / "cache", None)
    sampler = ShardWindowSampler(reader.shard_of(np.arange(len(reader))), window=8, seed=0)
    started = time.perf_counter()
    count = sum(len(reader.read(row)) > 0 for row in sampler)
    result["read_dist_train_per_s"] = round(count / (time.perf_counter() - started))

    orders = []
    for workers in (0, 2):
        loader = StreamingDataLoader(StreamingDataset(str(args.work / "litdata"), shuffle=True, seed=0), batch_size=64,
                                     num_workers=workers, collate_fn=paths)
        orders.append([path for batch in loader for path in batch])
    result["litdata_same_order_0_and_2_workers"] = orders[0] == orders[1]
    result["litdata_first_rows_0_vs_2_workers"] = [order[:4] for order in orders]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
