"""dist_train: one Accelerate training loop for image classifiers, from a laptop CPU to a SLURM cluster."""

from dist_train.api import Trainer

__all__ = ["Trainer"]
__version__ = "0.1.0"
