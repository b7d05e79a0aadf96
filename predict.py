"""Predict: `accelerate launch ... predict.py --config configs/digits.yaml --checkpoint runs/digits/checkpoints/best`."""
import sys

from dist_train.cli import predict_main

if __name__ == "__main__":
    sys.exit(predict_main())
