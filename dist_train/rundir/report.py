"""What a run tells the outside, from the main process only: console lines, config.yaml, run_info.json and
metrics.jsonl in the run directory, and TensorBoard / W&B through tracking.Tracking."""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import accelerate
import torch
import torchvision
from accelerate import Accelerator
from tqdm.auto import tqdm

from dist_train import __version__
from dist_train.config import Config, preprocessing, preprocessing_summary, to_dict
from dist_train.job.distributed import main_print
from dist_train.rundir.files import write_text_atomic
from dist_train.rundir.tracking import Tracking, flat_hparams

METRICS_FILE = "metrics.jsonl"
RUN_INFO_FILE = "run_info.json"


def bars() -> bool:
    """Progress bars where they can be redrawn: stderr is a terminal, or a notebook's kernel (tqdm.auto draws a widget).
    Anywhere else (a file, a pipe) a bar is a line of carriage returns; the training loop prints step lines there
    instead (step_line)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def progress(iterable, desc: str, accelerator: Accelerator) -> tqdm:
    """A bar on the main process only, on a terminal (bars()); elsewhere nothing is drawn."""
    return tqdm(iterable, desc=desc, disable=not (accelerator.is_main_process and bars()), leave=False, dynamic_ncols=True,
                mininterval=0.5)


def step_line(step: int, total_steps: int, epoch: int, epochs: int, fraction: float, values: dict, epoch_left_s: float,
              run_left_s: float) -> str:
    """A training step's line for a log file: where the run is, its loss, LR and speed, and how long is left."""
    return (f"step {step}/{total_steps}  epoch {epoch}/{epochs} {100 * fraction:3.0f}%  loss {values['train/loss']:.4f}  "
            f"lr {values['train/lr']:.2e}  {values['train/samples_per_sec']:,.0f} samples/s  eta epoch {_clock(epoch_left_s)}, "
            f"run {_clock(run_left_s)}")


def _clock(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Reporter:
    """The run's voice. Every method may be called on every rank; only the main process writes or prints."""

    def __init__(self, accelerator: Accelerator, config: Config, output_dir: Path):
        self.accelerator, self.config, self.output_dir = accelerator, config, output_dir
        self.tracking: Tracking | None = None

    def say(self, text: str) -> None:
        main_print(self.accelerator, text)

    def start(self, info: dict, config_yaml: str, resumed_at: int | None, model_name: str) -> None:
        """The run directory's records at the start: the resolved config, run_info.json, a fresh metrics.jsonl
        (unless resumed: it keeps the lines up to the checkpoint), TensorBoard; then the start-up line."""
        if self.accelerator.is_main_process:
            (self.output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(config_yaml)
            write_json(self.output_dir / RUN_INFO_FILE, info)
            if resumed_at is None:
                (self.output_dir / METRICS_FILE).write_text("")
        self.tracking = Tracking(self.accelerator, self.config.tracking, self.output_dir, flat_hparams(to_dict(self.config)),
                                 resumed_at=resumed_at)
        self.say(f"dist_train: {info['num_processes']} process(es), {info['distributed_type']}, device {self.accelerator.device}; "
                 f"global batch {info['global_batch']} = {info['per_process_batch']} x {info['num_processes']} processes "
                 f"x {info['grad_accum_steps']} accumulation; {info['batches_per_epoch_per_process']} batches/epoch/process, "
                 f"{info['optimizer_steps_per_epoch']} optimizer steps/epoch; {model_name}: "
                 f"{info['parameters']['trainable']:,} trainable, {info['parameters']['frozen']:,} frozen parameters; "
                 f"{preprocessing_summary(self.config.data)}")

    def scalars(self, values: dict[str, float], step: int) -> None:
        """TensorBoard (and W&B) scalars; nothing before start()."""
        if self.tracking is not None:
            self.tracking.scalars(values, step)

    def epoch(self, record: dict, metrics: dict, step: int) -> None:
        """One evaluation: its line in metrics.jsonl (written before the epoch's save: a run killed in between replays
        the epoch, and the resume drops lines past its checkpoint) and its TensorBoard scalars."""
        if self.accelerator.is_main_process:
            with open(self.output_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.scalars(
            {"train/epoch_loss": record["train_loss"], "epoch": record["epoch"],
             **{f"val/{k[4:]}": v for k, v in metrics.items() if k.startswith("val_")},
             **({"data/skipped_samples": record["skipped_samples"]} if self.config.data.bad_samples == "skip" else {})},
            step=step,
        )

    def figures(self, step: int, metrics: dict, labels: list[str], dataset, outputs: dict) -> None:
        """Per-class F1, the confusion matrix and the worst mistakes of a classification evaluation."""
        self.tracking.evaluation(step, metrics, labels, dataset, outputs)

    def finish(self, summary: dict, best: float | None) -> None:
        """The final metrics beside the hyper-parameters (TensorBoard), run_info.json completed, the last line."""
        monitor = self.config.checkpoint.monitor
        if best is not None:
            last = read_last_metrics(self.output_dir) if self.accelerator.is_main_process else {}
            finals = {k: v for k, v in last.items() if k.startswith("val_") and isinstance(v, float)}
            self.tracking.finish({f"best_{monitor}": best, **finals}, summary["global_step"])
        if self.accelerator.is_main_process:
            write_json(self.output_dir / RUN_INFO_FILE, summary)
        if best is not None:
            self.say(f"best {monitor} {best:.4f} at epoch {summary['best']['epoch']}; checkpoints in "
                     f"{self.output_dir / 'checkpoints'}, TensorBoard logs in {self.output_dir / 'tensorboard'}")


def describe_run(accelerator: Accelerator, parts, processes: list[dict], resumed_from: Path | None, started: float) -> dict:
    """run_info.json at the start: versions, processes and devices, the batch layout, the data and the model."""
    config, layout = parts.config, parts.layout
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "versions": {
            "dist_train": __version__, "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "accelerate": accelerate.__version__,
        },
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "devices": [f"{p['host']}:{p['device']}" for p in processes],
        "processes": processes,
        "mixed_precision": config.train.mixed_precision,
        "zero_stage": accelerator.state.deepspeed_plugin.zero_stage if config.deepspeed.enabled else None,
        "per_process_batch": layout.batch_size,
        "grad_accum_steps": layout.accum,
        "global_batch": layout.global_batch,
        "batches_per_epoch_per_process": layout.batches_per_process,
        "optimizer_steps_per_epoch": layout.steps_per_epoch,
        "total_optimizer_steps": layout.total_steps(config.train.epochs, config.train.max_steps),
        "train_samples": len(parts.train_set),
        "val_samples": len(parts.val_set),
        "task": parts.task.kind,
        "classes": parts.labels,
        "parameters": {"trainable": parts.parameters[0], "frozen": parts.parameters[1]},
        "preprocessing": preprocessing(config.data),
        "resumed_from": str(resumed_from) if resumed_from is not None else None,
        **({"distill": parts.distill.describe} if getattr(parts, "distill", None) is not None else {}),
        **({"pseudo_labels": parts.pseudo} if getattr(parts, "pseudo", None) is not None else {}),
    }


def epoch_line(config: Config, headline: list[str], record: dict, metrics: dict, improved: bool) -> str:
    """The console's line for an epoch."""
    return (f"epoch {record['epoch']}/{config.train.epochs}  train_loss {record['train_loss']:.4f}  "
            + "".join(f"{k} {metrics[k]:.4f}  " for k in headline)
            + f"lr {record['lr']:.2e}  {record['samples_per_sec']:.0f} samples/s"
            + ("  * best" if improved else ""))


def read_last_metrics(output_dir: Path) -> dict:
    records = read_metrics(output_dir)
    return records[-1] if records else {}


def write_json(path: Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=1))


def best_epoch_metric(run_dir: Path, name: str) -> float | None:
    """Metric `name` of the run's best epoch (run_info.json's best, metrics.jsonl's line of that epoch), None before
    any: a fold's score on the rows it holds out, a hold-out run's score of its best checkpoint."""
    info = json.loads((run_dir / RUN_INFO_FILE).read_text()) if (run_dir / RUN_INFO_FILE).is_file() else {}
    epoch = (info.get("best") or {}).get("epoch")
    records = [r for r in read_metrics(run_dir) if r.get("epoch") == epoch]
    return float(records[-1][name]) if records and name in records[-1] else None


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl, one record per evaluation ([] before the first)."""
    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
