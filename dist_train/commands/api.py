"""dist_train.Trainer: the loop of train.py and predict.py from Python, with your own model, loss and datasets."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_train.config import Config, config_from_dict, load_config, to_dict
from dist_train.job.distributed import forget_process_group  # (here before: `from dist_train.commands.api import ...`)

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset


class Trainer:
    """Train and predict as `train.py` and `predict.py` do -- the same `trainer.fit` and `inference.predict` --
    with objects of your own in place of what the config would build.

        trainer = Trainer("configs/digits.yaml", model=MyNet(), output_dir="runs/mine", **{"optim.lr": 3e-4})
        summary = trainer.fit()      # the run summary, also in <output_dir>/run_info.json
        trainer.predict()            # <output_dir>/submission.csv from <output_dir>/checkpoints/best

    `config`: a Config, a dict of sections, a YAML/JSON file, or None (the defaults). `overrides`: config keys
    with Python values, dotted for nested ones: `seed=7, output_dir="runs/x", **{"optim.lr": 3e-4}`; checked
    like the file (an unknown key is an error naming the closest one).

    `model`: any nn.Module whose output is (batch, classes) logits; model.pretrained and model.freeze apply to
    it as to a built-in one, and it is the object that trains. `loss`: a module mapping (logits, targets) to one
    loss per sample (a `reduction` attribute is set to "none"; another shape is an error). `train_dataset`,
    `val_dataset`: map-style datasets yielding (image tensor, target) or (image, target, index); optional
    attributes `classes` (class names; else set model.num_classes) and `set_epoch(epoch)` (called each epoch;
    persistent loader workers see it only through shared memory, custom.IndexedDataset.set_epoch).
    Each left out comes from the config: model.file / loss.file / data.file, else the built-in ones.

    Under `accelerate launch --num_processes N script.py` every process runs the script and builds its own
    objects (give every rank the same; DDP starts all ranks from rank 0's weights). As with train.py, a bad
    input then ends the job with one line `error: ...` and exit code 2, and a rank that fails ends the job at
    once; in one process errors are raised. A preemption signal (SIGTERM, SIGUSR1) saves a checkpoint and
    exits with code 75 (requeued under SLURM) in both cases, as train.py does: fit(resume="auto") continues.
    """

    def __init__(self, config: Config | dict | str | Path | None = None, *, model: nn.Module | None = None,
                 loss: nn.Module | None = None, train_dataset: Dataset | None = None, val_dataset: Dataset | None = None,
                 **overrides: Any):
        if config is None or isinstance(config, (str, Path)):
            self.config = load_config(config, values=overrides)
        elif isinstance(config, Config):
            self.config = config_from_dict(to_dict(config), overrides)
        elif isinstance(config, dict):
            self.config = config_from_dict(config, overrides)
        else:
            raise TypeError(f"config must be a Config, a dict, a YAML/JSON path or None, not {type(config).__name__}")
        self.model, self.loss = model, loss
        self.train_dataset, self.val_dataset = train_dataset, val_dataset

    def fit(self, resume: str | Path | None = None, overwrite: bool = False) -> dict:
        """Train; returns the run summary (what run_info.json holds). `resume`: "auto" (the newest intact
        checkpoint of output_dir; with none yet, from the beginning) or a checkpoint directory; `overwrite`: start
        afresh in an existing run directory (without either, an existing run is an error)."""
        from dist_train.loop.trainer import fit

        resume = str(resume) if resume is not None else None
        if self.config.distill.teacher is not None and self.train_dataset is None:
            from dist_train.commands.distill import prepare_teacher

            self._run(prepare_teacher, self.config, resume, overwrite)  # the teacher's outputs, once, as train.py does
        return self._run(fit, self.config, resume, overwrite, model=self.model,
                         loss=self.loss, train_dataset=self.train_dataset, val_dataset=self.val_dataset)

    def predict(self, checkpoint: str | Path | None = None, dataset: Dataset | None = None,
                output: str | Path | None = None, split: str = "test") -> Path | None:
        """Write the submission CSV (id, label in the dataset's order) from a checkpoint; returns its path on the
        main process, None on the others.

        `checkpoint`: a checkpoint directory or weights file (default <output_dir>/checkpoints/best); the
        checkpoint's weights are loaded into this Trainer's model, when it has one. `dataset`: what to predict,
        items (image, target) or an image alone, an `ids` attribute for the submission's ids (else the row
        index); default: split "val" this Trainer's val_dataset, and otherwise data.file's or the config's own.
        `split`: "test", or "val" to also write the metrics to <output stem>.metrics.json.
        """
        from dist_train.commands.inference import predict

        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', not {split!r}")
        if dataset is None and split == "val":
            dataset = self.val_dataset
        checkpoint = checkpoint if checkpoint is not None else Path(self.config.output_dir) / "checkpoints" / "best"
        return self._run(predict, self.config, checkpoint, output, split, model=self.model, loss=self.loss, dataset=dataset)

    def _run(self, function, *args, **kwargs):
        """`function` with the failure handling of train.py / predict.py under a launcher (cli.py)."""
        from dist_train.errors import DistTrainError
        from dist_train.job.distributed import fail, is_main_process_env
        from dist_train.job.faults import (
            PREEMPTED_EXIT_CODE,
            Preempted,
            die_with_launcher,
            report_failure,
            requeue_slurm_job,
        )

        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        die_with_launcher()
        try:
            return function(*args, **kwargs)
        except DistTrainError as exc:
            if launched:  # every rank raised it (rank 0 says it once) or one did (it says so and ends the job)
                fail(exc)
            raise
        except Preempted as exc:  # a checkpoint is saved: exit 75 and let SLURM requeue the job, as train.py does
            if is_main_process_env():
                print(f"preempted: {exc}", file=sys.stderr, flush=True)
                if self.config.checkpoint.requeue_on_preemption:
                    requeue_slurm_job()
            sys.exit(PREEMPTED_EXIT_CODE)
        except Exception as exc:
            report_failure(exc)  # under a launcher: named once and this rank ends now; one process: raised
            raise
        finally:
            forget_process_group()
