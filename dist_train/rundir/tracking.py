"""What a run reports while it trains: TensorBoard, and the trackers tracking.trackers adds (MLflow, W&B, Comet, Aim,
ClearML, DVCLive), from the main process only.

Scalars go through Accelerate's trackers (`accelerator.log`, a no-op on other ranks). Per evaluation
the main process also writes per-class F1, a confusion-matrix figure and a grid of the worst
validation mistakes to TensorBoard (the figure to MLflow too), and at the end the hyper-parameters with the final
metrics (the other trackers: the flattened config as parameters at the start, the final metrics at the end).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from dist_train.config import TrackingConfig
from dist_train.errors import ConfigError
from dist_train.job.distributed import same_on_all_ranks
from dist_train.rundir.mlflow_runs import ResumableMLflow, connect

TENSORBOARD_DIR = "tensorboard"


class Tracking:
    """The run's trackers; every method is safe to call on every rank (only the main process writes)."""

    def __init__(self, accelerator, cfg: TrackingConfig, run_dir: Path, hparams: dict, resumed_at: int | None):
        from accelerate.tracking import TensorBoardTracker

        self.accelerator = accelerator
        self.cfg = cfg
        self.hparams = hparams
        # after a resume, TensorBoard hides what the killed run logged past the checkpoint
        purge = {"purge_step": resumed_at + 1} if resumed_at is not None else {}
        trackers = [TensorBoardTracker(TENSORBOARD_DIR, str(run_dir), **purge)]
        names = list(dict.fromkeys([*cfg.trackers, *(["wandb"] if cfg.wandb else [])]))
        if "wandb" in names:
            from accelerate.tracking import WandBTracker

            run_id = wandb_run_id(run_dir) if accelerator.is_main_process else None
            trackers.append(WandBTracker(cfg.wandb_project, name=run_dir.name, dir=str(run_dir), resume="allow", id=run_id))
        if "mlflow" in names and mlflow_on(accelerator, cfg):
            trackers.append(ResumableMLflow(cfg, run_dir, resumed=resumed_at is not None))
        trackers += [name for name in names if name not in ("tensorboard", "wandb", "mlflow")]  # Accelerate builds them
        accelerator.log_with = trackers  # Accelerate starts them, and logs, on the main process only
        accelerator.init_trackers(cfg.project)  # (the project of the trackers Accelerate builds; TensorBoard's is its own)
        if not accelerator.is_main_process:
            return
        if "wandb" in names:
            accelerator.get_tracker("wandb", unwrap=True).config.update(hparams, allow_val_change=True)
        for tracker in self.others():
            tracker.store_init_configuration(hparams)
            if isinstance(tracker, ResumableMLflow) and (run_dir / "config.yaml").is_file():
                tracker.log_artifact(run_dir / "config.yaml")

    def others(self) -> list:
        """The main process's trackers beside TensorBoard and W&B (whose parameters go their own ways)."""
        if not self.accelerator.is_main_process:
            return []
        return [t for t in self.accelerator.trackers if t.name not in ("tensorboard", "wandb")]

    @property
    def writer(self):
        """TensorBoard's SummaryWriter on the main process, else None."""
        if not self.accelerator.is_main_process:
            return None
        return self.accelerator.get_tracker("tensorboard", unwrap=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log(values, step=step)

    def evaluation(self, step: int, metrics: dict, classes: list[str], dataset, outputs: dict) -> None:
        """Per-class F1, the confusion matrix and the worst mistakes of one evaluation."""
        writer = self.writer
        if writer is None:
            return
        for name, f1 in zip(classes, metrics["per_class_f1"]):
            writer.add_scalar(f"val_f1_per_class/{name}", f1, step)
        if not self.cfg.images:
            return
        figure = confusion_figure(metrics["confusion_matrix"], classes)
        for tracker in self.others():
            if isinstance(tracker, ResumableMLflow):
                tracker.log_figure(figure, "confusion_matrix.png")  # (the latest evaluation's)
        writer.add_figure("val/confusion_matrix", figure, step)
        # (the grid reads the built-in dataset's image files; a user's dataset has none to show)
        grid = worst_mistakes_grid(dataset, outputs, classes, self.cfg.num_images) if hasattr(dataset, "records") else None
        if grid is not None:
            writer.add_image("val/worst_mistakes", grid, step, dataformats="HWC")

    def finish(self, final_metrics: dict[str, float], step: int) -> None:
        """The hyper-parameters beside the final metrics (TensorBoard's HPARAMS tab), in the run's own
        event file (SummaryWriter.add_hparams would open a second one); the trackers are closed by
        `accelerator.end_training()`."""
        writer = self.writer
        if writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        for tracker in self.others():
            tracker.log({f"final/{k}": v for k, v in final_metrics.items()}, step=step)
        metrics = {f"hparam/{k}": v for k, v in final_metrics.items()}
        for summary in hparams(self.hparams, metrics):
            writer._get_file_writer().add_summary(summary)
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)


def mlflow_on(accelerator, cfg: TrackingConfig) -> bool:
    """The main process checks the server (mlflow_runs.connect); its verdict -- on, off (a warning), or the error every
    rank raises -- is every rank's."""
    verdict = None
    if accelerator.is_main_process:
        try:
            verdict = "on" if connect(cfg) else "off"
        except ConfigError as exc:
            verdict = str(exc)
    verdict = same_on_all_ranks(accelerator, verdict)
    if verdict not in ("on", "off"):
        raise ConfigError(verdict)
    return verdict == "on" and accelerator.is_main_process


def wandb_run_id(run_dir: Path) -> str:
    """One W&B run per run directory, kept across resumes."""
    path = run_dir / "wandb" / "run_id"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        import secrets

        path.write_text(secrets.token_hex(4))
    return path.read_text().strip()


def flat_hparams(config: dict, prefix: str = "") -> dict:
    """Nested config -> {"optim.lr": 0.003, ...}; lists and None become strings (what hparams accept)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def confusion_figure(matrix: list[list[int]], classes: list[str]):
    """A matplotlib figure of counts[true, predicted], darker = more."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.array(matrix)
    size = max(3.0, 0.45 * len(classes) + 1.5)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(counts, cmap="Blues")
    axes.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 10 else 0)
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if len(classes) <= 30:
        for (i, j), count in np.ndenumerate(counts):
            axes.text(j, i, str(count), ha="center", va="center", fontsize=7,
                      color="white" if count > counts.max() / 2 else "black")
    figure.tight_layout()
    return figure


def worst_mistakes_grid(dataset, outputs: dict, classes: list[str], count: int) -> np.ndarray | None:
    """The misclassified validation images with the highest loss, as one uint8 HWC grid, each captioned
    "<true> as <predicted> (<its probability>)"; None when nothing was misclassified."""
    from PIL import Image, ImageDraw

    logits, targets, indices = outputs["logits"], outputs["targets"], outputs["indices"]
    predicted = logits.argmax(1)
    wrong = ((predicted != targets) & (targets >= 0)).nonzero().flatten()
    if len(wrong) == 0:
        return None
    losses = outputs["losses"][wrong] if len(outputs.get("losses", [])) else -logits.softmax(1)[wrong, targets[wrong]]
    chosen = wrong[torch.argsort(losses, descending=True)[:count]]
    probs = logits.softmax(1)
    tiles = []
    for row in chosen.tolist():
        file = dataset.source(int(indices[row]))[0] if hasattr(dataset, "source") else dataset.records.paths[int(indices[row])]
        image = Image.open(file).convert("RGB").resize((96, 96), Image.NEAREST)
        canvas = Image.new("RGB", (96, 112), "white")
        canvas.paste(image, (0, 16))
        caption = f"{classes[targets[row]]} as {classes[predicted[row]]} ({probs[row, predicted[row]]:.2f})"
        ImageDraw.Draw(canvas).text((2, 2), caption[:18], fill="red")
        tiles.append(np.asarray(canvas))
    columns = min(len(tiles), 8)
    rows = math.ceil(len(tiles) / columns)
    grid = np.full((rows * 112, columns * 96, 3), 255, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        grid[r * 112:(r + 1) * 112, c * 96:(c + 1) * 96] = tile
    return grid
