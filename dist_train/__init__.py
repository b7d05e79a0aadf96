"""dist_train: one Accelerate training loop for image classifiers, from a laptop CPU to a SLURM cluster.

The packages, from the base up (a package imports only those below it; docs/architecture.md, tests/test_structure.py):
    config, errors, custom   the run's typed configuration; errors; users' own files
    job/                     the process group, its faults (preemption, hangs, watchdog), the batch layout
    data/                    tables and splits, datasets and transforms, loaders and their workers
    models/                  networks, losses, tasks and metrics, optimizers and schedules, EMA
    rundir/                  the run directory: checkpoints, lock, reports, TensorBoard, submission
    loop/                    the training loop: parts built, the Run, its policies, fit()
    commands/                train/predict command lines, CV, --debug, export, the Trainer API, dist-train
"""
import os

# Before anything imports pyarrow (data/columns.py): its jemalloc would start a background thread as it loads, a rank
# would never be one-threaded, and its loader workers' fork server a fresh interpreter importing torch again instead of
# a fork of the rank (data/workers.py, 4.5 s of CPU a rank)
os.environ.setdefault("JE_ARROW_MALLOC_CONF", "background_thread:false")

from dist_train import compat  # noqa: E402

compat.install()  # dist_train.checkpoint and the other paths from before the subpackages still import

__all__ = ["Trainer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Trainer":  # imported when asked for: `import dist_train.data.synthetic` needs none of the loop
        from dist_train.commands.api import Trainer

        return Trainer
    raise AttributeError(f"module 'dist_train' has no attribute {name!r}")
