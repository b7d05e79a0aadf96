"""`make gpu-check`: every CUDA path and the ResNet-50 benchmark on a lent GPU machine as it is, time-boxed, in one report.

    make gpu-check OUT=DIR                # = bash bench/gpu_check.sh DIR = python3 bench/gpu_check.py DIR
    python3 bench/gpu_check.py DIR --dry  # dry mode on purpose (automatic without CUDA)

It uses the Python it is started with (no venv, no install). Wheels in wheels/ of packages that Python lacks
(DeepSpeed and what it needs: README, "GPU check") are unpacked into the work directory and put on PYTHONPATH.
Every step has a time box and the whole run a budget (--budget, default 465 s: the issue's 8 minutes, less a
margin), so one hang cannot eat the rest:

  environment     versions, GPU, NCCL/cuDNN, what is missing                                 (CPU and GPU)
  cpu-tests       the suite's fast parts a version difference could break                    (CPU and GPU)
  gpu-tests       tests/test_gpu.py: bf16, fp16, nvJPEG, no host sync, DeepSpeed ZeRO-3      (GPU)
  train-predict   train.py + predict.py on the digits, bf16, on the GPU                      (GPU)
  two-processes   2 ranks on the one GPU: NCCL if it accepts them, else gloo over CUDA       (GPU)
  bench-data      10,240 photo-like JPEGs around 500x375, written in parallel                 (GPU)
  bench           bench/throughput.py: ResNet-50, 224 px, bf16, channels_last               (GPU)
  bench-compile   the same with torch.compile (dist_train, then synthetic as time allows)   (GPU)

The first five GPU steps run side by side (small jobs on a big machine); the benchmark runs alone after them.
Without CUDA, or with --dry, every GPU step is skipped, saying so, and the rest runs (under 3 minutes on the
2-core CI machine; tests/test_gpu_check.py runs it). DIR receives gpu_report.md and gpu_report.json only,
rewritten after every step, so a kill at the time limit still leaves a report. The exit code is 0 when every
step passed or was skipped for want of a GPU in dry mode, 1 otherwise, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from gpu_report import TAIL_CHARS, goals, markdown

ROOT = Path(__file__).resolve().parent.parent
REPORT_MD, REPORT_JSON = "gpu_report.md", "gpu_report.json"
DEFAULT_BUDGET_S = 465
PHASE_A_S = 175
"""The side-by-side steps end within this many seconds of their start; the benchmark gets the rest."""
RESERVE_S = 5
"""Kept back from the budget for the last report."""

PACKAGES = ["torch", "torchvision", "accelerate", "timm", "deepspeed", "transformers", "tensorboard", "scikit-learn",
            "safetensors", "numpy", "pillow", "pyyaml", "tqdm", "matplotlib", "pytest", "pytest-timeout", "psutil"]
REQUIRED = {"torch", "torchvision", "accelerate", "tensorboard", "scikit-learn", "safetensors", "numpy", "pillow",
            "pyyaml", "tqdm", "matplotlib", "pytest"}
CPU_TESTS = ["tests/test_config.py", "tests/test_data.py", "tests/test_metrics.py", "tests/test_checkpoint.py",
             "tests/test_losses.py", "tests/test_optim.py", "tests/test_models.py", "tests/test_ema.py",
             "tests/test_mixing.py", "tests/test_sharding.py", "tests/test_cli.py", "tests/test_policy.py",
             "tests/test_structure.py", "tests/test_split_data.py"]
"""Parsing, data, metrics, checkpoint files, losses, optimizers, torchvision models, EMA, mixup, Accelerate's
sharding, and 1-process digits runs through the command line (on the GPU where there is one): what a
torch/torchvision/accelerate release can move. None starts 2 processes (NCCL may refuse them on one GPU)."""
if os.environ.get("GPU_CHECK_CPU_TESTS"):  # the suite's own dry run of this script: a few files (it runs them all itself)
    CPU_TESTS = os.environ["GPU_CHECK_CPU_TESTS"].split(",")

BENCH = {  # ResNet-50 as in BENCHMARKS.md, fewer images and steps than bench/throughput.py's preset, to fit the box
    "gpu": dict(count=10240, classes=100, size="500x375", model="resnet50", image_size=224, batch_size=256, workers=16,
                steps=40, mixed_precision="bf16"),
    "rehearsal": dict(count=192, classes=4, size="64x48", model="small_cnn", image_size=16, batch_size=8, workers=1,
                      steps=4, mixed_precision="no"),
}
ENV_PROBE = r"""
import json, os, shutil, sys, sysconfig
from importlib import metadata
found = {}
for name in sys.argv[1:]:
    try:
        found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        found[name] = None
info = {"python": sys.version.split()[0], "executable": sys.executable, "packages": found,
        # torch.compile's Triton builds a small C launcher: it needs a C compiler and Python.h
        "c_compiler": shutil.which("cc") or shutil.which("gcc"),
        "python_h": os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h"))}
import torch
info["torch_cuda"] = torch.version.cuda
info["cuda_available"] = torch.cuda.is_available()
info["gpus"] = []
if info["cuda_available"]:
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        info["gpus"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                             "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count})
details = {  # each read on its own: a detail this torch does not have must not hide the rest
    "bf16": lambda: torch.cuda.is_bf16_supported(),
    "cudnn": lambda: torch.backends.cudnn.version(),
    "nccl": lambda: ".".join(map(str, torch.cuda.nccl.version())),
}
for key, read in details.items():
    try:
        info[key] = read() if info["cuda_available"] else None
    except Exception as exc:
        info[key] = f"{type(exc).__name__}: {exc}"
import torchvision.ops  # (torchvision's compiled ops must load: roi_align and nvJPEG live there)
print("PROBE " + json.dumps(info, default=str))
"""


@dataclass
class Step:
    name: str
    title: str
    cuda: bool
    box_s: float
    status: str = "pending"
    """pending, running, passed, failed, timeout (cut by its box, or not started for want of time), skipped"""
    reason: str = ""
    seconds: float | None = None
    details: dict = field(default_factory=dict)
    log_tail: str = ""


class TimeBoxed(Exception):
    """A command ran past its time box and was killed with its process group."""


class Check:
    """The run: its mode, its clock, the steps and the report they fill in."""

    def __init__(self, out: Path, work: Path, budget_s: float, force_dry: bool, rehearse: bool, command: str):
        self.out, self.work, self.command = out, work, command
        self.started = time.time()
        self.deadline = time.monotonic() + budget_s - RESERVE_S
        self.budget_s = budget_s
        self.force_dry, self.rehearse = force_dry, rehearse
        self.mode = "pending"
        self.environment: dict = {}
        self.lock = threading.Lock()
        self.steps = {s.name: s for s in [
            Step("environment", "versions, GPU, what is missing", False, 60),
            Step("cpu-tests", "the suite's fast parts (" + ", ".join(Path(t).stem[5:] for t in CPU_TESTS) + ")", False, 150),
            Step("gpu-tests", "tests/test_gpu.py", True, 170),
            Step("train-predict", "train.py + predict.py, digits, bf16, 1 GPU", True, 90),
            Step("two-processes", "2 processes on the GPU(s): NCCL, else gloo over CUDA", True, 120),
            Step("bench-data", "JPEGs for the benchmark", True, 120),
            Step("bench", "bench/throughput.py: synthetic, plain, dist_train (decode device / workers), timm", True, 150),
            Step("bench-compile", "bench/throughput.py --compile: dist_train, then synthetic", True, 300),
        ]}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if force_dry:  # dry on a GPU machine too: the CPU steps must not find the GPU
            self.env["CUDA_VISIBLE_DEVICES"] = ""

    # --- time and commands -------------------------------------------------------------------------

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, step: Step, cmd: list[str], timeout: float, log: Path, env: dict | None = None) -> int:
        """Runs `cmd` in its own process group, output to `log`; kills the group at `timeout` (TimeBoxed)
        and, in any case, whatever of it is left when it ends (e.g. loader workers of a crashed rank)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                    start_new_session=True)
            try:
                return proc.wait(timeout=max(timeout, 1))
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGTERM)  # the benchmark ends its runner's group on SIGTERM
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                raise TimeBoxed(f"ran past its {timeout:.0f} s time box: {' '.join(Path(c).name for c in cmd[:3])} ...") from None
            finally:
                _kill_group(proc, signal.SIGKILL)
                proc.wait()

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def accelerate_launch(self, processes: int) -> list[str]:
        script = Path(sys.executable).parent / "accelerate"
        launcher = [str(script), "launch"] if script.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]
        # a port of its own: another launch on this machine (a test's, a user's) may hold Accelerate's default 29500
        return [*launcher, "--config_file", str(ROOT / "accelerate_config.yaml"), "--num_processes", str(processes),
                "--main_process_port", str(free_port())]

    # --- steps -------------------------------------------------------------------------------------

    def execute(self, name: str, body, box_end: float | None = None) -> None:
        """Runs one step's `body(step, timeout)` inside its box (and `box_end`, a time.monotonic() limit)."""
        step = self.steps[name]
        if step.cuda and self.mode == "dry":
            why = "--dry was given" if self.force_dry else "no CUDA device (torch.cuda.is_available() is False)"
            return self.finish(step, "skipped", f"dry mode: {why}")
        limit = min(self.left(), (box_end - time.monotonic()) if box_end is not None else step.box_s, step.box_s)
        if limit < 15:
            return self.finish(step, "timeout", f"not started: {max(limit, 0):.0f} s left of the {self.budget_s:.0f} s budget")
        with self.lock:
            step.status = "running"
            print(f"[{self.elapsed():5.0f} s] {name}: started ({limit:.0f} s box)", flush=True)
        begun = time.monotonic()
        try:
            status, reason = body(step, limit)
        except TimeBoxed as exc:
            status, reason = "timeout", str(exc)
        except Exception as exc:  # a bug in this script: the step fails, the others still run
            status, reason = "failed", f"{type(exc).__name__}: {exc}"
        step.seconds = time.monotonic() - begun
        if status in ("failed", "timeout") and not step.log_tail:
            step.log_tail = _tail(self.work / "logs" / f"{name}.log")
        self.finish(step, status, reason)

    def finish(self, step: Step, status: str, reason: str) -> None:
        with self.lock:
            step.status, step.reason = status, reason
            print(f"[{self.elapsed():5.0f} s] {step.name}: {status.upper()}" + (f" ({reason})" if reason else ""), flush=True)
            self.write()

    def elapsed(self) -> float:
        return time.time() - self.started

    def step_environment(self, step: Step, timeout: float):
        installed = unpack_wheels(ROOT / "wheels", self.work / "site")
        if installed:
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.work / "site"), self.env.get("PYTHONPATH")]))
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), self.env.get("PYTHONPATH")]))
        log = self.work / "logs" / "environment.log"
        code = self.run(step, self.python("-c", ENV_PROBE, *PACKAGES), timeout, log)
        probe = next((line[6:] for line in log.read_text().splitlines() if line.startswith("PROBE ")), None)
        if code != 0 or probe is None:
            self.mode = "failed"
            return "failed", f"the Python at {sys.executable} cannot import torch (exit {code})"
        info = json.loads(probe)
        info["wheels_unpacked"] = installed
        info["nvidia_smi"] = nvidia_smi()
        info["cpu_count"] = os.cpu_count()
        info["host"] = socket.gethostname()
        info["env"] = {k: v for k, v in os.environ.items()
                       if k.startswith(("NCCL_", "TORCH_", "PYTORCH_", "CUDA_", "OMP_NUM_THREADS", "PYTHONPATH"))}
        info["missing"] = sorted(name for name, version in info["packages"].items() if version is None)
        self.environment = info
        if self.rehearse:
            self.mode = "rehearsal"
        elif self.force_dry or not info["cuda_available"]:
            self.mode = "dry"
        else:
            self.mode = "gpu"
        step.details = {"mode": self.mode, "missing": info["missing"]}
        missing_required = sorted(REQUIRED & set(info["missing"]))
        if missing_required:
            return "failed", f"required packages missing: {', '.join(missing_required)}"
        notes = [f"mode {self.mode}"]
        if info["missing"]:
            notes.append(f"not installed: {', '.join(info['missing'])}")
        if installed:
            notes.append(f"unpacked from wheels/: {', '.join(installed)}")
        return "passed", "; ".join(notes)

    def step_pytest(self, files: list[str], extra: list[str]):
        def body(step: Step, timeout: float):
            xml = self.work / f"{step.name}.xml"
            xml.unlink(missing_ok=True)
            # -v: a test's name is in the log as it starts, so a time box that cuts pytest shows where it was
            cmd = self.python("-m", "pytest", *files, "-v", "-rA", "-p", "no:cacheprovider", f"--junitxml={xml}",
                              f"--basetemp={self.work / (step.name + '-tmp')}", *extra)  # apart from the other pytest
            if self.environment["packages"].get("pytest-timeout"):  # one hung test fails, the rest still run
                cmd.append(f"--timeout={int(min(120, timeout - 10))}")
            code = self.run(step, cmd, timeout, self.work / "logs" / f"{step.name}.log")
            tests = parse_junit(xml) if xml.is_file() else []
            counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
            step.details = {"counts": counts, "tests": tests}
            failures = [t for t in tests if t["outcome"] == "failed"]
            if failures:
                step.log_tail = "\n\n".join(f"{t['name']}: {t['message']}" for t in failures)[-TAIL_CHARS * 2:]
            summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
            if code == 0:
                return "passed", summary
            return "failed", f"pytest exit {code}" + (f": {summary}" if summary else "")
        return body

    def step_train_predict(self, step: Step, timeout: float):
        out, data = self.work / "train-predict", self.work / "digits"
        log = self.work / "logs" / "train-predict.log"
        common = ["--config", "configs/digits.yaml", f"output_dir={out}", f"data.root={data}"]
        precision = "bf16"
        begun = time.monotonic()
        code = self.run(step, self.python("train.py", *common, f"train.mixed_precision={precision}", "train.epochs=4",
                                          "data.num_workers=2", "--overwrite"), timeout, log)
        if code != 0:
            return "failed", f"train.py exit {code}"
        info = json.loads((out / "run_info.json").read_text())
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        code = self.run(step, self.python("predict.py", *common, "data.num_workers=2", "--checkpoint",
                                          str(out / "checkpoints" / "best")), timeout - (time.monotonic() - begun), log)
        if code != 0:
            return "failed", f"predict.py exit {code}"
        score = score_submission(out / "submission.csv", data)
        step.details = {"device": info["devices"][0], "distributed_type": info["distributed_type"],
                        "mixed_precision": info["mixed_precision"], "val_accuracy": metrics[-1]["val_accuracy"],
                        "samples_per_sec": metrics[-1]["samples_per_sec"], "test": score}
        expected_device = "cpu" if self.mode == "rehearsal" else "cuda"
        problems = []
        if expected_device not in info["devices"][0]:
            problems.append(f"ran on {info['devices'][0]}, not {expected_device}")
        if info["mixed_precision"] != precision:
            problems.append(f"mixed precision {info['mixed_precision']}")
        if not score["ids_in_order"]:
            problems.append("submission ids differ from info.csv's")
        if metrics[-1]["val_accuracy"] <= 0.5:
            problems.append(f"val_accuracy {metrics[-1]['val_accuracy']:.3f} (it did not learn)")
        return ("failed", "; ".join(problems)) if problems else (
            "passed", f"val_accuracy {metrics[-1]['val_accuracy']:.4f}, test accuracy {score['accuracy']:.4f} "
                      f"({score['rows']} rows) on {info['devices'][0].split(':', 1)[1]}")

    def step_two_processes(self, step: Step, timeout: float):
        """2 ranks through accelerate launch, with the backend Accelerate picks (NCCL on GPUs). On one GPU NCCL
        may refuse them ("Duplicate GPU detected": one rank per GPU); then gloo over CUDA (DIST_TRAIN_BACKEND)."""
        gpus = len(self.environment.get("gpus", []))
        log = self.work / "logs" / "two-processes.log"
        begun = time.monotonic()
        left = lambda: timeout - (time.monotonic() - begun)  # noqa: E731
        default = "nccl" if self.mode == "gpu" else "gloo (CPU)"
        # NCCL names the reason ("Duplicate GPU detected") only in its own log lines
        first = self.two_process_run(step, default, min(left(), 60), log, {"NCCL_DEBUG": "WARN"})
        attempts = [first]
        refused = not first["ok"] and "Duplicate GPU" in first.get("output", "")
        if refused:
            first["note"] = 'NCCL refused 2 ranks on one GPU ("Duplicate GPU detected": one rank per GPU)'
        if not first["ok"] or self.mode == "rehearsal":  # (the rehearsal tries the gloo switch too)
            attempts.append(self.two_process_run(step, "gloo", left(), log, {"DIST_TRAIN_BACKEND": "gloo"}))
        for attempt in attempts:
            attempt.pop("output", None)
        step.details = {"gpus": gpus, "attempts": attempts}
        if all(a["ok"] for a in attempts):
            where = "" if self.mode != "gpu" else (" on 2 GPUs" if gpus >= 2 else " on one GPU (NCCL accepted 2 ranks)")
            return "passed", f"DDP over {default}{where}: {first['summary']}"
        if refused and attempts[-1]["ok"]:
            return "passed", f"{first['note']}; gloo over CUDA instead: {attempts[-1]['summary']}"
        return "failed", "; ".join(f"{a['backend']}: {a['summary']}" for a in attempts)

    def two_process_run(self, step: Step, backend: str, timeout: float, log: Path, env: dict) -> dict:
        out, data = self.work / f"two-processes-{backend}", self.work / "digits"
        common = ["--config", "configs/digits.yaml", f"output_dir={out}", f"data.root={data}", "data.num_workers=1"]
        result = {"backend": backend, "ok": False}
        if timeout < 15:
            return {**result, "summary": "not started: out of time"}
        begun = time.monotonic()
        start = log.stat().st_size if log.is_file() else 0
        try:  # a hang of the first backend still leaves time for the second
            code = self.run(step, [*self.accelerate_launch(2), "train.py", *common, "train.epochs=2",
                                   "train.mixed_precision=bf16", "train.distributed_timeout_s=40", "--overwrite"],
                            timeout, log, env)
        except TimeBoxed as exc:
            return {**result, "summary": f"train.py {exc}", "output": log.read_text(errors="replace")[start:]}
        result["output"] = log.read_text(errors="replace")[start:]
        if code != 0:
            return {**result, "summary": f"train.py exit {code}"}
        info = json.loads((out / "run_info.json").read_text())
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        try:
            code = self.run(step, [*self.accelerate_launch(2), "predict.py", *common, "--checkpoint",
                                   str(out / "checkpoints" / "best")], timeout - (time.monotonic() - begun), log, env)
        except TimeBoxed:
            code = "none: killed at the time box"
        score = score_submission(out / "submission.csv", data) if code == 0 else None
        result.update(distributed_type=info["distributed_type"], num_processes=info["num_processes"], devices=info["devices"],
                      rank_batches=metrics[-1]["rank_batches"], val_accuracy=metrics[-1]["val_accuracy"],
                      same_weights=len(set(info["final_weights_sha256_per_rank"])) == 1, test=score)
        problems = []
        if info["num_processes"] != 2 or len(set(metrics[-1]["rank_batches"])) != 1:
            problems.append(f"{info['num_processes']} processes, batches per rank {metrics[-1]['rank_batches']}")
        if not result["same_weights"]:
            problems.append("the ranks' final weights differ")
        if score is None or not score["ids_in_order"]:
            problems.append(f"2-process predict.py failed (exit {code})" if score is None else "submission ids out of order")
        result["ok"] = not problems
        result["summary"] = "; ".join(problems) if problems else (
            f"{info['distributed_type'].split('.')[-1]}, batches per rank {metrics[-1]['rank_batches']}, identical weights, "
            f"val_accuracy {metrics[-1]['val_accuracy']:.4f}, 2-process submission in order")
        return result

    def bench_settings(self) -> dict:
        return BENCH["rehearsal" if self.mode == "rehearsal" else "gpu"]

    def bench_dir(self) -> Path:
        s = self.bench_settings()
        return self.work / f"jpegs-{s['count']}-{s['classes']}-{s['size']}"

    def step_bench_data(self, step: Step, timeout: float):
        s = self.bench_settings()
        workers = max(1, (os.cpu_count() or 2) // 2)  # the other half of the cores runs the tests beside it
        code = self.run(step, self.python("bench/make_jpegs.py", str(self.bench_dir()), "--count", str(s["count"]),
                                          "--classes", str(s["classes"]), "--size", s["size"], "--workers", str(workers)),
                        timeout, self.work / "logs" / "bench-data.log")
        return ("passed", f"{s['count']} JPEGs around {s['size']}, {workers} process(es)") if code == 0 else (
            "failed", f"make_jpegs.py exit {code}")

    def step_bench(self, compile: bool):
        def body(step: Step, timeout: float):
            if self.steps["bench-data"].status != "passed":
                return "failed", "no benchmark data (bench-data did not pass)"
            s = self.bench_settings()
            result = self.work / f"{step.name}.json"
            result.unlink(missing_ok=True)
            device = "cpu" if self.mode == "rehearsal" else "cuda"
            if compile:
                runners, runner_timeout = "dist_train,synthetic", timeout - 5
            else:
                runners = "synthetic,plain,dist_train,dist_train+data.decode=workers,timm"
                runner_timeout = 75
            cmd = self.python("bench/throughput.py", "--device", device, "--data", str(self.bench_dir()), "--repeats", "1",
                              "--decode", "device", "--runners", runners, "--json", str(result),
                              "--runner-timeout", str(int(runner_timeout)), "--time-limit", str(int(timeout - 5)),
                              "--processes", "1", *(f"--{k.replace('_', '-')}={v}" for k, v in s.items()),
                              *(["--compile"] if compile else []))
            try:
                code, cut = self.run(step, cmd, timeout, self.work / "logs" / f"{step.name}.log"), None
            except TimeBoxed as exc:  # the runs done so far are in the JSON: keep them
                code, cut = None, str(exc)
            if not result.is_file():
                return ("timeout", cut) if cut else ("failed", f"throughput.py exit {code}, no results")
            figures = json.loads(result.read_text())
            if "rows" not in figures:  # cut before its summary: the runs themselves (1 repeat each)
                figures["rows"] = [{"runner": r["runner"], "processes": r["processes"], "images_per_sec": r["images_per_sec"],
                                    "step_ms": r["step_seconds"] * 1000, "data_wait": r["data_seconds"] / r["seconds"]}
                                   for r in figures.get("runs", [])]
            step.details = figures
            done = ", ".join(f"{r['runner']} {r['images_per_sec']:.0f} img/s" for r in figures.get("rows", [])) or "no figures"
            failed = figures.get("failed", [])
            if compile:  # synthetic compiled is a bonus: the step is about dist_train with train.compile
                failed = [f for f in failed if not (f["runner"] == "synthetic" and f["error"].startswith("not started"))]
            if failed:
                step.log_tail = "\n\n".join(f"{f['runner']}: {f['error']}\n{f.get('log_tail', '')}" for f in failed)[-TAIL_CHARS * 2:]
                return "failed", f"{done}; failed: " + ", ".join(f"{f['runner']} ({f['error']})" for f in failed)
            if cut:
                return "timeout", f"{cut}; {done}"
            if code != 0:
                return "failed", f"throughput.py exit {code}; {done}"
            return "passed", done
        return body

    # --- the run -----------------------------------------------------------------------------------

    def main(self) -> int:
        self.work.mkdir(parents=True, exist_ok=True)
        for stale in ("logs", "site"):
            shutil.rmtree(self.work / stale, ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.write()
        self.execute("environment", self.step_environment)
        if self.mode not in ("gpu", "dry", "rehearsal"):
            for step in self.steps.values():
                if step.status == "pending":
                    self.finish(step, "skipped", "no usable torch (see environment)")
            return self.close()
        phase_end = time.monotonic() + PHASE_A_S
        chains = [
            ["cpu-tests"], ["gpu-tests"], ["train-predict", "two-processes"], ["bench-data"],
        ]
        bodies = {
            "cpu-tests": self.step_pytest(CPU_TESTS, ["-m", "not slow"]),
            "gpu-tests": self.step_pytest(["tests/test_gpu.py"], []),
            "train-predict": self.step_train_predict,
            "two-processes": self.step_two_processes,
            "bench-data": self.step_bench_data,
        }
        threads = [threading.Thread(target=lambda c=chain: [self.execute(n, bodies[n], phase_end) for n in c])
                   for chain in chains]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.execute("bench", self.step_bench(compile=False))
        self.execute("bench-compile", self.step_bench(compile=True))
        return self.close()

    def close(self) -> int:
        report = self.write(final=True)
        # stdout's end is what a remote run shows first: the summary last, the failed steps' logs before it
        for step in self.steps.values():
            if step.status in ("failed", "timeout") and step.log_tail:
                print(f"\n--- {step.name} ({step.status}), end of its log:\n{step.log_tail.strip()[-TAIL_CHARS:]}", flush=True)
        print("\n" + markdown(report, with_logs=False) + f"\nfull report: {self.out / REPORT_MD}, {self.out / REPORT_JSON}",
              flush=True)
        return 0 if self.passed() else 1

    def passed(self) -> bool:
        return all(s.status == "passed" or (s.status == "skipped" and self.mode == "dry") for s in self.steps.values())

    # --- the report --------------------------------------------------------------------------------

    def write(self, final: bool = False) -> dict:
        report = {
            "result": ("passed" if self.passed() else "failed") if final else "running",
            "mode": self.mode,
            "command": self.command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "wall_seconds": round(self.elapsed(), 1),
            "budget_seconds": self.budget_s,
            "environment": self.environment,
            "steps": [asdict(s) for s in self.steps.values()],
            "goals": goals(self.steps["bench"].details, self.steps["bench-compile"].details) if self.mode == "gpu" else None,
        }
        _atomic_write(self.out / REPORT_JSON, json.dumps(report, indent=1, default=str))
        _atomic_write(self.out / REPORT_MD, markdown(report))
        return report


# ----------------------------------------------------------------------------------------------
# helpers


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, chars: int = TAIL_CHARS) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def unpack_wheels(wheels: Path, site: Path) -> list[str]:
    """Unpacks each wheel in `wheels` whose distribution this Python lacks into `site` (a wheel is a zip of
    what goes on sys.path; no pip, no network, nothing installed into the machine's Python). Returns
    "name version" of each one unpacked."""
    unpacked = []
    for wheel in sorted(wheels.glob("*.whl")) if wheels.is_dir() else []:
        name, version = wheel.name.split("-")[:2]
        try:
            metadata.version(name)
            continue  # the machine's own copy wins
        except metadata.PackageNotFoundError:
            pass
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
        unpacked.append(f"{name} {version}")
    return unpacked


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "nvidia-smi: no answer in 15 s"
    return proc.stdout.strip() or proc.stderr.strip()


def parse_junit(path: Path) -> list[dict]:
    """Each test case of a pytest JUnit XML: name, outcome (passed/failed/skipped), seconds, message."""
    tests = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or "") + "\n" + (child.text or "")[-TAIL_CHARS:]
            elif child.tag == "skipped":
                outcome, message = "skipped", child.get("message") or ""
        tests.append({"name": f"{Path(case.get('classname', '').replace('.', '/')).name}::{case.get('name')}",
                      "outcome": outcome, "seconds": round(float(case.get("time", 0)), 1), "message": message.strip()})
    return tests


def score_submission(submission: Path, digits: Path) -> dict:
    """Row count, ids in info.csv's order, and accuracy against the digits' held-out test labels."""
    rows = list(csv.DictReader(open(submission, newline="")))
    expected = [row["id"] for row in csv.DictReader(open(digits / "info.csv", newline=""))]
    truth = {row["id"]: row["label"] for row in csv.DictReader(open(digits / "test_labels.csv", newline=""))}
    column = next(c for c in rows[0] if c != "id")
    hits = sum(str(row[column]) == truth[row["id"]] for row in rows)
    return {"rows": len(rows), "ids_in_order": [r["id"] for r in rows] == expected, "accuracy": hits / max(len(rows), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=str(ROOT / "runs" / "gpu-check"), type=Path,
                        help="where gpu_report.md and gpu_report.json go (default runs/gpu-check)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "gpu-check-work",
                        help="logs, runs and the benchmark's JPEGs (kept between runs: the JPEGs are made once)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole check")
    parser.add_argument("--dry", action="store_true", help="dry mode even with a GPU: every CUDA step skipped")
    parser.add_argument("--rehearse", action="store_true",
                        help="for developing this script on a CPU machine: run the GPU steps on the CPU, tiny")
    args = parser.parse_args()
    out, work = args.out.resolve(), args.work.resolve()
    if out == work or work in out.parents:
        parser.error(f"the report directory {out} must lie outside the work directory {work}")
    if args.budget < 60:
        parser.error("--budget must be at least 60 s")
    if args.dry and args.rehearse:
        parser.error("--dry and --rehearse exclude each other")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot create the report directory {out}: {exc.strerror}", file=sys.stderr)
        return 2
    command = " ".join(["python3" if Path(sys.executable).name.startswith("python3") else sys.executable,
                        *[a if " " not in a else repr(a) for a in sys.argv]])
    return Check(out, work, args.budget, args.dry, args.rehearse, command).main()


if __name__ == "__main__":
    sys.exit(main())
