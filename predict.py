"""Predict: `accelerate launch ... predict.py --config configs/digits.yaml --checkpoint runs/digits/checkpoints/best`."""
from dist_train.commands.cli import exit_process, predict_main

if __name__ == "__main__":
    exit_process(predict_main())
