"""dist_train: one Accelerate training loop for image classifiers, from a laptop CPU to a SLURM cluster."""

__version__ = "0.1.0"
