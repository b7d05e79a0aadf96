"""What a run reports while it trains: TensorBoard, and the trackers tracking.trackers adds (MLflow, W&B, Comet, Aim,
ClearML, DVCLive), from the main process only.

A resumed run logs each (metric, step) once in every tracker: what the killed run's trackers hold from the checkpoint's
step on is read back at the start (rundir/logged.py), and only what they lack is logged.

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
from accelerate.tracking import TensorBoardTracker, WandBTracker

from dist_train.config import TrackingConfig
from dist_train.errors import ConfigError
from dist_train.job.distributed import same_on_all_ranks
from dist_train.rundir.logged import WANDB_STEP, Held, tensorboard_held, wandb_held
from dist_train.rundir.mlflow_runs import ResumableMLflow, connect

TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_ONLY = ("val_f1_per_class/", "hparam/", "val/confusion_matrix", "val/worst_mistakes")
"""What the main process writes to TensorBoard alone (Tracking.evaluation, Tracking.finish)."""


class Tracking:
    """The run's trackers; every method is safe to call on every rank (only the main process writes)."""

    def __init__(self, accelerator, cfg: TrackingConfig, run_dir: Path, hparams: dict, resumed_at: int | None):
        self.accelerator = accelerator
        self.cfg = cfg
        self.hparams = hparams
        trackers = [ResumableTensorBoard(run_dir, resumed_at)]
        names = list(dict.fromkeys([*cfg.trackers, *(["wandb"] if cfg.wandb else [])]))
        if "wandb" in names:
            run_id = wandb_run_id(run_dir) if accelerator.is_main_process else None
            trackers.append(ResumableWandB(cfg.wandb_project, run_dir, run_id, resumed_at))
        if "mlflow" in names and mlflow_on(accelerator, cfg):
            trackers.append(ResumableMLflow(cfg, run_dir, resumed_at))
        trackers += [name for name in names if name not in ("tensorboard", "wandb", "mlflow")]  # Accelerate builds them
        accelerator.log_with = trackers  # Accelerate starts them, and logs, on the main process only
        accelerator.init_trackers(cfg.project)  # (the project of the trackers Accelerate builds; TensorBoard's is its own)
        if not accelerator.is_main_process:
            return
        for tracker in accelerator.trackers:
            if (line := tracker.held.line() if isinstance(getattr(tracker, "held", None), Held) else None):
                print(line, flush=True)
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
    def tensorboard(self) -> "ResumableTensorBoard":
        return self.accelerator.get_tracker("tensorboard")

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
        if writer is None or self.tensorboard.held.holds("epoch", step):  # (the killed run logged this evaluation)
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
        if self.tensorboard.held.holds(next(iter(metrics)), step):  # (written once, by a run killed after writing it)
            return
        for summary in hparams(self.hparams, metrics):
            writer._get_file_writer().add_summary(summary)
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)


class ResumableTensorBoard(TensorBoardTracker):
    """Accelerate's TensorBoard tracker, resumed: the killed run's events past the checkpoint hidden (purge_step), and
    at the checkpoint's step itself (an evaluation the killed run may have logged after it) only what it lacks."""

    def __init__(self, run_dir: Path, resumed_at: int | None):
        super().__init__(TENSORBOARD_DIR, str(run_dir), **({"purge_step": resumed_at + 1} if resumed_at is not None else {}))
        self.resumed_at, self.held = resumed_at, Held("tensorboard")

    def start(self):
        super().start()
        if self.resumed_at is not None:
            self.held = Held("tensorboard", tensorboard_held(self.logging_dir, self.resumed_at), self.resumed_at)

    def log(self, values: dict, step: int | None = None, **kwargs):
        super().log(self.held.fresh(values, step), step=step, **kwargs)


class ResumableWandB(WandBTracker):
    """Accelerate's W&B tracker: one W&B run per run directory (its id kept there), every value logged with the
    optimizer step as `global_step`, the x-axis of every chart (W&B refuses a row whose `_step` goes backwards, as an
    evaluation at a resumed run's first step would); after a resume, only what the W&B run lacks."""

    def __init__(self, project: str, run_dir: Path, run_id: str | None, resumed_at: int | None):
        super().__init__(project, name=run_dir.name, dir=str(run_dir), resume="allow", id=run_id)
        self.run_dir, self.resumed_at, self.held = run_dir, resumed_at, Held("wandb")

    def start(self):
        super().start()
        self.run.define_metric(WANDB_STEP)
        self.run.define_metric("*", step_metric=WANDB_STEP)
        if self.resumed_at is None:
            return
        try:
            self.held = Held("wandb", wandb_held(self.run, self.run_dir, 0), self.resumed_at)
        except Exception as exc:  # the server's API: whatever it or the network did
            print(f"warning: W&B: the run's history could not be read ({type(exc).__name__}: {str(exc)[:160]}); "
                  f"values the killed run logged past step {self.resumed_at} may be logged twice", flush=True)
            return
        self._restore()

    def _restore(self) -> None:
        """What the killed run logged up to the checkpoint and W&B lost, logged again from TensorBoard's record (every
        value logged through Accelerate is in both): wandb-core drops the rows it has not written when the process
        that started it is killed (offline, all of them: measured with wandb 0.31)."""
        lost: dict[int, dict[str, float]] = {}
        for (tag, step), value in tensorboard_held(self.run_dir / TENSORBOARD_DIR, 0).items():
            if step <= self.resumed_at and value is not None and not tag.startswith(TENSORBOARD_ONLY) \
                    and not self.held.holds(tag, step):
                lost.setdefault(step, {})[tag] = value
        for step in sorted(lost):
            self.run.log({**lost[step], WANDB_STEP: step})
            self.held.restored.update((tag, step) for tag in lost[step])
        if lost:
            print(f"wandb: {sum(map(len, lost.values()))} values of steps {min(lost)}-{max(lost)} that the killed run's "
                  f"W&B had not written logged again from TensorBoard's record", flush=True)

    def log(self, values: dict, step: int | None = None, **kwargs):
        values = self.held.fresh(values, step)
        if values:
            self.run.log({**values, **({WANDB_STEP: step} if step is not None else {})}, **kwargs)


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
