"""Train: `python train.py --config configs/digits.yaml` (one process) or `accelerate launch ... train.py ...`."""
import sys

from dist_train.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
