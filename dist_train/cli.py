"""Command lines of train.py and predict.py: parse, run, and turn bad input into one line and exit code 2."""
from __future__ import annotations

import argparse
import sys

from dist_train.config import load_config
from dist_train.distributed import fail
from dist_train.errors import DistTrainError

OVERRIDES_HELP = "dotted overrides, e.g. optim.lr=3e-4 data.batch_size=64 output_dir=/tmp/run1 seed=7"


def _parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-c", "--config", help="YAML or JSON config (default: built-in defaults = the digits run)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    return parser


def train_main(argv: list[str] | None = None) -> int:
    parser = _parser("Train a classifier (accelerate launch train.py ... for several processes).")
    parser.add_argument("--resume", metavar="auto|DIR", help="continue from <output_dir>/checkpoints/last (auto) or a checkpoint directory")
    parser.add_argument("--overwrite", action="store_true", help="start afresh even if output_dir already holds a run")
    args = parser.parse_intermixed_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        from dist_train.trainer import fit  # torch & co. load only once the config is known to be good

        fit(config, resume=args.resume, overwrite=args.overwrite)
    except DistTrainError as exc:
        fail(str(exc))
    return 0


def predict_main(argv: list[str] | None = None) -> int:
    parser = _parser("Write a submission CSV from a checkpoint (sharded over all launched processes).")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. runs/digits/checkpoints/best) or a .safetensors file")
    parser.add_argument("--output", help="submission path (default: inference.output or <output_dir>/submission.csv)")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="val: predict the labelled validation split and write its metrics beside the CSV")
    args = parser.parse_intermixed_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        from dist_train.inference import predict

        predict(config, args.checkpoint, args.output, args.split)
    except DistTrainError as exc:
        fail(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
