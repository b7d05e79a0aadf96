"""Training throughput, end to end (JPEG files -> decode -> augment -> forward -> backward -> step), of
dist_train and, in the same run on the same data and model, of what a user would otherwise run:

  plain      a hand-written PyTorch loop (Dataset + DataLoader + DDP + AdamW): the overhead floor
  synthetic  the same model fed random tensors already on the device: the compute ceiling
  timm       timm's loader (its train.py's input pipeline, with its GPU prefetcher) + the plain loop,
             when timm is installed

    python bench/throughput.py --device cpu --quick     # ~1 minute: small CNN, 32 px, 1 and 2 processes
    python bench/throughput.py --device cuda            # ResNet-50, 224 px, bf16, one GPU, 20k JPEGs
    python bench/throughput.py --device cuda --compile  # the same with torch.compile (train.compile for dist_train)

Each runner is launched with torch.distributed.run (N processes, gloo on CPU, NCCL on GPU) and trains
two epochs of exactly --steps optimizer steps over the same file list; the second epoch is timed
(loader workers already started), as wall time including the wait for its first batches. "data wait" is
the share of that time the training process spent blocked on the loader. The last line printed is
`ratio_vs_plain=<dist_train step time / plain loop step time>` (the largest over the process counts).
`--json FILE` also writes every run and the summary there, rewritten after each runner (bench/gpu_check.py
reads it); `--runner-timeout` and `--time-limit` bound a time-boxed run.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PRESETS = {
    "cpu": dict(count=4096, classes=10, size=(160, 120), model="small_cnn", image_size=32, batch_size=64,
                workers=1, steps=30, processes=[1, 2], mixed_precision="no", decode="workers"),
    "cuda": dict(count=20000, classes=100, size=(500, 375), model="resnet50", image_size=224, batch_size=256,
                 workers=16, steps=60, processes=[1], mixed_precision="bf16", decode="auto"),
}
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 tensor-core peaks, for MFU; the first name contained in the device's name wins (PCIe before SXM)."""


# ----------------------------------------------------------------------------------------------
# the runners (one process of a torch.distributed.run job each)


def _rows(csv_path: Path) -> list[tuple[str, int]]:
    with open(csv_path, newline="") as f:
        return [(row["image"], int(row["label"])) for row in csv.DictReader(f)]


def _setup(device_kind: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if device_kind == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, rank, device


def _model(args, device: torch.device):
    from dist_train.config import ModelConfig
    from dist_train.models.networks import build_model

    model = build_model(ModelConfig(name=args.model), args.classes, 3, args.image_size).to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_epochs(loader, step, device, set_epoch=lambda e: None, steps: int | None = None) -> dict:
    """Two epochs; the second timed: wall seconds, seconds blocked on the loader, steps."""
    for epoch in range(2):
        set_epoch(epoch)
        _sync(device)
        start, waited, done = time.perf_counter(), 0.0, 0
        batches = iter(loader)
        while steps is None or done < steps:
            t = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            waited += time.perf_counter() - t
            step(batch)
            done += 1
        _sync(device)
    return {"seconds": time.perf_counter() - start, "data_seconds": waited, "steps": done}


def _trainer(args, model, device, world):
    """forward + backward + clip + step, as a user writes it (bf16 autocast on GPU, fused AdamW)."""
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    if args.compile:  # after the DDP wrap, as Accelerate does for dist_train
        model = torch.compile(model)
    bf16 = args.mixed_precision == "bf16"
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    def step(batch):
        images, targets = batch[0], batch[1]
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_plain(args) -> dict:
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset, DistributedSampler
    from torchvision.transforms import v2

    world, rank, device = _setup(args.device)
    transform = v2.Compose([
        v2.ToImage(), v2.RandomResizedCrop(args.image_size, antialias=True), v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    rows = _rows(Path(args.data) / args.train_csv)

    class Files(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            path, label = rows[i]
            with Image.open(Path(args.data) / path) as image:
                return transform(image.convert("RGB")), label

    sampler = DistributedSampler(Files(), world, rank, seed=0) if world > 1 else None
    loader = DataLoader(Files(), args.batch_size, shuffle=sampler is None, sampler=sampler, num_workers=args.workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
                        prefetch_factor=4 if args.workers > 0 else None, drop_last=True)
    step = _trainer(args, _model(args, device), device, world)
    return _timed_epochs(loader, step, device, set_epoch=sampler.set_epoch if sampler else lambda e: None)


def run_synthetic(args) -> dict:
    world, rank, device = _setup(args.device)
    step = _trainer(args, _model(args, device), device, world)
    g = torch.Generator(device=device).manual_seed(rank)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device, generator=g)
    targets = torch.randint(0, args.classes, (args.batch_size,), device=device, generator=g)
    batches = [(images, targets)] * args.steps
    return _timed_epochs(batches, step, device)


def run_timm(args) -> dict:
    from timm.data import create_dataset, create_loader

    world, rank, device = _setup(args.device)
    dataset = create_dataset("", root=str(Path(args.data) / "train"), split="train", is_training=True)
    loader = create_loader(dataset, input_size=(3, args.image_size, args.image_size), batch_size=args.batch_size,
                           is_training=True, use_prefetcher=device.type == "cuda", num_workers=args.workers,
                           distributed=world > 1, device=device, persistent_workers=True)
    step = _trainer(args, _model(args, device), device, world)
    return _timed_epochs(loader, step, device, steps=args.steps)


def run_dist_train(args) -> dict:
    from dist_train.config import load_config
    from dist_train.loop.trainer import fit

    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(args.work) / "dist_train_run"
    config = load_config(None, [
        f"output_dir={out}", "data.source=csv", f"data.root={args.data}", f"data.train={args.train_csv}",
        f"data.val={args.val_csv}", "data.test=null", f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}", f"data.decode={args.decode}",
        "data.train_crop=random_resized_crop", "data.train_augment=[{name: RandomHorizontalFlip}]",
        f"model.name={args.model}", "train.epochs=2", f"train.mixed_precision={args.mixed_precision}",
        "train.log_every_n_steps=1000", "scheduler.name=constant", "tracking.images=false", "checkpoint.keep_last=1",
        f"train.compile={str(args.compile).lower()}", *args.set,
    ])
    summary = fit(config, overwrite=True)
    second = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1]
    assert summary["optimizer_steps_per_epoch"] == args.steps, summary["optimizer_steps_per_epoch"]
    return {"seconds": second["epoch_seconds"], "data_seconds": second["data_wait_fraction"] * second["epoch_seconds"],
            "steps": args.steps, "world": world}


RUNNERS = {"plain": run_plain, "synthetic": run_synthetic, "timm": run_timm, "dist_train": run_dist_train}


def worker(args) -> None:
    from dist_train.job.faults import exit_process

    result = RUNNERS[args.worker](args)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.result).write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank done with its collectives before any tears the group down
        torch.distributed.destroy_process_group()
    # no interpreter finalization, as the CLI's ranks end: with gloo's threads still around it can abort a rank
    # after its work is done ("terminate called without an active exception"), which the orchestrator saw as a failure
    exit_process(0)


# ----------------------------------------------------------------------------------------------
# the orchestrator


_running: subprocess.Popen | None = None
"""The runner job now running (its own process group), ended with us when we are terminated."""


def _end_running(signum, frame) -> None:
    if _running is not None and _running.poll() is None:
        os.killpg(_running.pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def launch(args, runner: str, processes: int, train_csv: str, work: Path, timeout: float | None = None) -> dict:
    """One job of `runner`; `dist_train+KEY=VALUE+...` is dist_train with those overrides (after --set).

    Returns its figures, or {"error": ...} when it failed or ran past `timeout` seconds."""
    global _running
    base, *overrides = runner.split("+")
    name = base if not overrides else f"{base}-{abs(hash(runner)) % 10**8}"
    result = work / f"{name}-{processes}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", __file__,
           "--worker", base, "--result", str(result), "--work", str(work), "--train-csv", train_csv]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k in ("device", "data", "model", "image_size", "batch_size", "workers", "steps", "classes",
                     "mixed_precision", "decode", "val_csv")]
    cmd += [f"--set={value}" for value in [*args.set, *overrides]] + (["--compile"] if args.compile else [])
    log = work / f"{name}-{processes}.log"
    with open(log, "w") as f:
        # its own process group: a timeout ends the launcher, its ranks and their loader workers together
        _running = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            code = _running.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(_running.pid, signal.SIGKILL)
            code = _running.wait()
            error = f"ran past its {timeout:.0f} s time box; killed"
        else:
            error = None if code == 0 and result.is_file() else f"failed (exit {code})"
        finally:
            _running = None
    if error:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"  {runner} with {processes} process(es) {error}; see {log}:", file=sys.stderr)
        print("    " + "\n    ".join(tail), file=sys.stderr)
        return {"error": error, "log_tail": "\n".join(tail)}
    value = json.loads(result.read_text())
    value["step_seconds"] = value["seconds"] / value["steps"]
    value["images_per_sec"] = value["steps"] * args.batch_size * processes / value["seconds"]
    return value


def flops_per_image(args) -> float:
    """Forward + backward FLOPs of one training image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(args, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, args.image_size, args.image_size)).sum().backward()
    return counter.get_total_flops() / 2


def orchestrate(args) -> None:
    from make_jpegs import make

    started = time.monotonic()
    signal.signal(signal.SIGTERM, _end_running)
    preset = PRESETS[args.device]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.quick:
        args.repeats = 1
    data = Path(args.data or ROOT / "bench" / "data" / f"{args.device}-{args.count}-{args.size[0]}x{args.size[1]}")
    make(data, args.count, args.classes, args.size)
    args.data = str(data)
    print(f"data: {args.count} JPEGs around {args.size[0]}x{args.size[1]} in {data} ({time.monotonic() - started:.0f} s)")
    rows = list(csv.DictReader(open(data / "train.csv", newline="")))
    work = Path(tempfile.mkdtemp(prefix="dist_train_bench_"))
    args.val_csv = "val_bench.csv"
    _write_rows(data / args.val_csv, rows[: args.batch_size])
    runners = ["synthetic", "plain", "dist_train"]
    try:
        import timm  # noqa: F401  (the runner imports what it needs)

        runners.append("timm")
    except ImportError:
        print("timm is not installed: its runner is skipped")
    if args.runners:
        unknown = [r for r in args.runners if r.split("+")[0] not in RUNNERS or ("+" in r and not r.startswith("dist_train+"))]
        if unknown:
            raise SystemExit(f"unknown runner(s) {', '.join(unknown)}: choose from {', '.join(RUNNERS)} "
                             f"(dist_train+KEY=VALUE for a variant)")
        runners = [r for r in args.runners if r.split("+")[0] in runners]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    table: dict[tuple[str, int], list[dict]] = {}
    failed: list[dict] = []

    def save_json(summary: dict | None = None) -> None:
        if args.json:
            runs = [{"runner": r, "processes": p, **v} for (r, p), values in table.items() for v in values]
            _write_json(Path(args.json), {"device": device, "versions": _versions(), "settings": _settings(args, runners),
                                          "runs": runs, "failed": failed, **(summary or {})})

    for processes in args.processes:
        train_csv = f"train_bench_{processes}.csv"
        needed = args.steps * args.batch_size * processes
        if needed > len(rows):
            raise SystemExit(f"{args.steps} steps x {args.batch_size} x {processes} processes needs {needed} images; "
                             f"the data set has {len(rows)} (--count)")
        _write_rows(data / train_csv, rows[:needed])
        for repeat in range(args.repeats):  # interleaved, so that drifts in machine load hit every runner alike
            for runner in (runners if repeat % 2 == 0 else runners[::-1]):  # and neither always runs first
                if runner in ("synthetic", "timm") and repeat > 0:
                    continue
                timeout = args.runner_timeout
                if args.time_limit is not None:
                    left = args.time_limit - (time.monotonic() - started)
                    timeout = left if timeout is None else min(timeout, left)
                if timeout is not None and timeout < 10:
                    result = {"error": "not started: out of time (--time-limit)"}
                else:
                    result = launch(args, runner, processes, train_csv, work, timeout)
                if "error" not in result:
                    table.setdefault((runner, processes), []).append({**result, "repeat": repeat})
                else:
                    failed.append({"runner": runner, "processes": processes, "repeat": repeat + 1, **result})
                save_json()
    save_json(report(args, table, runners, device))
    if failed:
        raise SystemExit("failed runs, left out of the figures above: "
                         + "; ".join(f"{f['runner']} ({f['processes']} process(es), repeat {f['repeat']}): {f['error']}"
                                     for f in failed))


def _write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "image", "label"])
        writer.writeheader()
        writer.writerows(rows)


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)  # a reader (or a kill) never meets half a file


def _versions() -> dict:
    import accelerate
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "accelerate": accelerate.__version__, "cuda": torch.version.cuda}


def _settings(args, runners: list[str]) -> dict:
    keys = ("count", "classes", "size", "model", "image_size", "batch_size", "workers", "steps", "processes",
            "mixed_precision", "decode", "repeats", "compile", "set")
    return {**{k: getattr(args, k) for k in keys}, "runners": runners}


def report(args, table: dict, runners: list[str], device: str) -> dict:
    """Prints the table, ratios and MFU; returns them for --json."""
    def median(runner, processes, key):
        values = [r[key] for r in table.get((runner, processes), [])]
        return statistics.median(values) if values else None

    summary: dict = {"rows": [], "ratios": [], "mfu": {}}
    print(f"\n{args.model}, {args.image_size} px, batch {args.batch_size} per process, {args.steps} steps timed, "
          f"{args.mixed_precision} precision{', torch.compile' if args.compile else ''}, on {device}; "
          f"median of {args.repeats} (plain, dist_train)")
    width = max([12, *(len(r) + 2 for r in runners)])
    print(f"{'runner':<{width}}{'procs':>6}{'img/s':>10}{'step ms':>10}{'data wait':>11}")
    for processes in args.processes:
        for runner in runners:
            step = median(runner, processes, "step_seconds")
            if step is None:
                continue
            wait = median(runner, processes, "data_seconds") / median(runner, processes, "seconds")
            runs = " ".join(f"{r['step_seconds'] * 1000:.1f}" for r in table[(runner, processes)])
            rate = median(runner, processes, "images_per_sec")
            print(f"{runner:<{width}}{processes:>6}{rate:>10.0f}{step * 1000:>10.1f}"
                  f"{wait:>10.0%}   step ms of each run: {runs}")
            summary["rows"].append({"runner": runner, "processes": processes, "images_per_sec": rate,
                                    "step_ms": step * 1000, "data_wait": wait})
    ratios = {}
    for processes in args.processes:
        ours, plain, synthetic = (median(r, processes, "step_seconds") for r in ("dist_train", "plain", "synthetic"))
        if ours and plain:
            ratios[processes] = ours / plain
            line = f"{processes} process(es): dist_train / plain loop step time = {ours / plain:.3f}"
            plain_runs = {r["repeat"]: r["step_seconds"] for r in table[("plain", processes)]}
            pairs = [r["step_seconds"] / plain_runs[r["repeat"]] for r in table[("dist_train", processes)]
                     if r["repeat"] in plain_runs]
            if len(pairs) > 1:  # each repeat's two runs ran back to back: drifts in machine load cancel
                line += f" (per repeat: median {statistics.median(pairs):.3f}, {min(pairs):.3f}-{max(pairs):.3f})"
            if synthetic:
                line += f"; data-fed / synthetic-fed images/s (dist_train) = {synthetic / ours:.3f}"
            print(line)
        for variant in ["dist_train", *(r for r in runners if r.startswith("dist_train+"))]:
            step = median(variant, processes, "step_seconds")
            if step and plain:
                if variant != "dist_train":
                    print(f"{processes} process(es): {variant} / plain loop step time = {step / plain:.3f}")
                summary["ratios"].append({"runner": variant, "processes": processes, "step_time_vs_plain": step / plain,
                                          "images_per_sec_vs_synthetic": synthetic / step if synthetic else None})
    if len(args.processes) > 1:
        first, last = args.processes[0], args.processes[-1]
        for runner in ("plain", "dist_train"):
            a, b = median(runner, first, "images_per_sec"), median(runner, last, "images_per_sec")
            if a and b:
                print(f"{runner}: {last} processes / {first} = x{b / a:.2f} images/s")
    if args.device == "cuda":
        flops, peak = flops_per_image(args), peak_tflops(device)
        summary.update(flops_per_image=flops, peak_tflops=peak)
        for runner in runners:
            rate = median(runner, args.processes[0], "images_per_sec")
            if rate and peak:
                summary["mfu"][runner] = rate * flops / (peak * 1e12 * args.processes[0])
                print(f"{runner}: MFU {summary['mfu'][runner]:.1%} "
                      f"({flops / 1e9:.1f} GFLOP per training image, {peak:.0f} TFLOP/s peak)")
    if ratios:
        summary["ratio_vs_plain"] = max(ratios.values())
        print(f"ratio_vs_plain={max(ratios.values()):.3f}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one repeat (about a minute on CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", help="data set directory (default: bench/data/<device>-...; generated once)")
    parser.add_argument("--count", type=int)
    parser.add_argument("--classes", type=int)
    parser.add_argument("--size", type=lambda t: tuple(int(v) for v in t.split("x")), help="JPEG size WIDTHxHEIGHT")
    parser.add_argument("--model")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int, help="per process")
    parser.add_argument("--workers", type=int, help="loader workers per process")
    parser.add_argument("--steps", type=int, help="optimizer steps per (timed) epoch")
    parser.add_argument("--processes", type=lambda t: [int(v) for v in t.split(",")], help="e.g. 1,2")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"])
    parser.add_argument("--decode", choices=["auto", "workers", "device"], help="dist_train's data.decode")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a dist_train config override for its runner (repeatable), e.g. --set train.nonfinite=ignore")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every runner's model (dist_train: train.compile=true); the first epoch compiles")
    parser.add_argument("--json", help="also write every run and the summary to this JSON file (rewritten after each runner)")
    parser.add_argument("--runner-timeout", type=float, help="seconds one runner may take; then it is killed and reported")
    parser.add_argument("--time-limit", type=float,
                        help="seconds for the whole benchmark: later runners get what is left, or are not started")
    parser.add_argument("--runners", type=lambda t: t.split(","),
                        help="only these runners, in this order, e.g. plain,dist_train; dist_train+KEY=VALUE[+KEY=VALUE] "
                             "adds a dist_train variant, e.g. plain,dist_train,dist_train+train.nonfinite=ignore")
    # internal: one runner's process
    parser.add_argument("--worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--train-csv", help=argparse.SUPPRESS)
    parser.add_argument("--val-csv", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
