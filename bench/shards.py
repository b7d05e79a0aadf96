"""Shard sets against image files (docs/how-to/shards.md): on the photo-like JPEG set (bench/make_jpegs.py),

  write      seconds for `dist-train shards` to write the training split (per 10,000 images), to a directory and to
             an S3 endpoint (moto's server on the loopback address, .venv/s3-server)
  train      training samples/s of dist_train's second epoch from the files and from the shards, 1 and 2 processes
             (accelerate launch, gloo), the two interleaved --repeats times; the median is reported
  cache      a 1-process run from the S3 copy with data.cache_limit a third of the set: the largest the cache
             directory grew (polled every 20 ms) against the limit, and that run's samples/s

    python bench/shards.py                      # 10,000 JPEGs at 160x120, small CNN at 32 px: ~10 minutes on 2 cores
    python bench/shards.py --count 2000 --repeats 1   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from make_jpegs import make, parse_size  # noqa: E402

BIN = Path(sys.executable).parent
S3_SERVER = ROOT / ".venv" / "s3-server" / "bin" / "moto_server"


def run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    return proc


def shards_command(data: Path, output: str, shard_mb: float, env: dict | None = None) -> float:
    started = time.perf_counter()
    run([str(BIN / "dist-train"), "shards", "--split", "train", "--output", output, "--shard-size", str(shard_mb),
         "data.source=csv", f"data.root={data}", "data.val=null"], env)
    return time.perf_counter() - started


def train(data: Path, out: Path, processes: int, shards: str | None, epochs: int, extra: list[str] = (),
          env: dict | None = None, val: Path | None = None) -> float:
    """Samples/s of the last epoch (metrics.jsonl)."""
    source = ["data.source=shards", f"data.train={shards}"] if shards else ["data.source=csv", "data.train=train.csv"]
    args = ["--config", str(ROOT / "configs" / "digits.yaml"), f"data.root={data}", "data.val=val.csv", "data.test=null",
            *source, "model.name=small_cnn", "data.image_size=32", "data.batch_size=64", "data.num_workers=1",
            "data.train_augment=[]", f"train.epochs={epochs}", "train.log_every_n_steps=1000", f"output_dir={out}",
            "--overwrite", *extra]
    if shards:  # the validation split from shards too
        args.append(f"data.val={val}")
    launch = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_config.yaml"),
              "--num_processes", str(processes), "--main_process_port", "0"]
    run([*launch, str(ROOT / "train.py"), *args], env)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    return float(last["samples_per_sec"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def directory_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except FileNotFoundError:
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--size", type=parse_size, default=(160, 120))
    parser.add_argument("--shard-mb", type=float, default=8.0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dist_train-bench-shards")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = make(args.work / f"jpegs-{args.count}-{args.size[0]}x{args.size[1]}", args.count, 10, args.size, val=512)
    size_mb = sum(p.stat().st_size for p in (data / "train").rglob("*.jpg")) / 1e6
    result = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "date": time.strftime("%Y-%m-%d"),
              "images": args.count, "image_size": f"{args.size[0]}x{args.size[1]}", "set_mb": round(size_mb, 1)}
    local = args.work / "shards"
    seconds = shards_command(data, str(local), args.shard_mb)
    run([str(BIN / "dist-train"), "shards", "--split", "val", "--output", f"{local}-val", "data.source=csv",
         f"data.root={data}"])
    index = json.loads((local / "index.json").read_text())
    result["write_local_s"] = round(seconds, 1)
    result["write_local_s_per_10k"] = round(seconds * 10000 / args.count, 1)
    result["shards"] = len(index["shards"])
    print(f"{args.count} JPEGs ({size_mb:.0f} MB) -> {len(index['shards'])} shards in {seconds:.1f} s", flush=True)

    speeds: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for processes in (1, 2):
            for name, shards in (("files", None), ("shards", str(local))):
                speed = train(data, args.work / f"run-{name}-{processes}", processes, shards, args.epochs,
                              val=Path(f"{local}-val"))
                speeds.setdefault(f"{name}_{processes}p", []).append(speed)
                print(f"  {name:6s} {processes} process(es): {speed:,.0f} samples/s", flush=True)
    result["train_samples_per_s"] = {k: round(statistics.median(v)) for k, v in speeds.items()}

    if S3_SERVER.is_file():
        port = free_port()
        server = subprocess.Popen([str(S3_SERVER), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                   "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
            time.sleep(2)
            from pyarrow import fs

            fs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True,
                            region="us-east-1").create_dir("bench")
            seconds = shards_command(data, "s3://bench/train", args.shard_mb, env)
            result["write_s3_s_per_10k"] = round(seconds * 10000 / args.count, 1)
            limit = int(sum(s["bytes"] for s in index["shards"]) / 3)
            cache, peak, done = args.work / "cache", [0], threading.Event()
            subprocess.run(["rm", "-rf", str(cache)])

            def poll() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], directory_bytes(cache / "shards"))
                    time.sleep(0.02)

            watcher = threading.Thread(target=poll, daemon=True)
            watcher.start()
            try:
                speed = train(data, args.work / "run-s3", 1, "s3://bench/train", 1,
                              [f"data.cache_dir={cache}", f"data.cache_limit={limit}", "data.shard_window=1"], env,
                              val=Path(f"{local}-val"))
            finally:
                done.set()
                watcher.join()
            result["cache"] = {"limit_mb": round(limit / 1e6, 1), "peak_mb": round(peak[0] / 1e6, 1),
                               "set_mb": round(3 * limit / 1e6, 1), "samples_per_s": round(speed)}
            print(f"  s3, cache limit {limit / 1e6:.1f} MB: peak {peak[0] / 1e6:.1f} MB, {speed:,.0f} samples/s", flush=True)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
