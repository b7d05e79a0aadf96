"""Train: `python train.py --config configs/digits.yaml` (one process) or `accelerate launch ... train.py ...`."""
from dist_train.commands.cli import exit_process, train_main

if __name__ == "__main__":
    exit_process(train_main())
