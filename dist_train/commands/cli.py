"""Command lines of train.py and predict.py: parse, run, and turn bad input into one line and exit code 2."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from dataclasses import replace

from dist_train.commands.versions import PrintVersion
from dist_train.config import load_config
from dist_train.data.workers import prestart_worker_server
from dist_train.errors import ConfigError, DistTrainError
from dist_train.job.distributed import fail, is_main_process_env
from dist_train.job.faults import (PREEMPTED_EXIT_CODE, Preempted, die_with_launcher, exit_process, report_failure,
                                   requeue_slurm_job)

OVERRIDES_HELP = "dotted overrides, e.g. optim.lr=3e-4 data.batch_size=64 output_dir=/tmp/run1 seed=7"


CHECKPOINT_FORMS = ("a checkpoint directory (e.g. runs/x/checkpoints/best), a run directory (its best checkpoint), a "
                    "cross-validation run's directory (every fold's best) or a study's directory (its best trial)")
LAST_HELP = "a run's (and each fold's) last checkpoint instead of its best"


def _parser(description: str, config_help: str = "YAML or JSON config (default: built-in defaults = the digits run)",
            prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-c", "--config", help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    parser.add_argument("--version", action=PrintVersion)
    return parser


def train_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = _parser("Train a classifier (accelerate launch train.py ... for several processes).", prog=prog)
    parser.add_argument("--resume", metavar="auto|DIR", help="continue from <output_dir>/checkpoints/last (auto) or a checkpoint directory")
    parser.add_argument("--overwrite", action="store_true", help="start afresh even if output_dir already holds a run")
    parser.add_argument("--debug", action="store_true",
                        help="one process: a summary, an overfit-one-batch check and a few batches of train/val/predict "
                             "into <output_dir>/debug, anomaly detection on, full tracebacks")
    args = parser.parse_intermixed_args(argv)
    die_with_launcher()
    config = None
    try:
        config = load_config(args.config, args.overrides)
        if args.debug:
            from dist_train.commands.debug import run_debug

            run_debug(one_fold(config), args.config)
            return 0
        prestart_worker_server(config.data)
        if config.hpo.trials:
            from dist_train.commands.hpo import tune

            tune(config, resume=args.resume, overwrite=args.overwrite)
            return 0
        if config.cv.folds:
            from dist_train.commands.cv import cross_validate

            cross_validate(config, resume=args.resume, overwrite=args.overwrite)
            return 0
        from dist_train.loop.trainer import fit

        if config.distill.teacher is not None:  # the teacher's outputs on the training table, computed once (or checked)
            from dist_train.commands.distill import prepare_teacher

            prepare_teacher(config, args.resume, args.overwrite)
        fit(config, resume=args.resume, overwrite=args.overwrite)
    except DistTrainError as exc:
        if args.debug:
            traceback.print_exc()
        fail(exc)
    except Preempted as exc:
        if is_main_process_env():
            print(f"preempted: {exc}", file=sys.stderr, flush=True)
            if config.checkpoint.requeue_on_preemption:
                requeue_slurm_job()
        sys.exit(PREEMPTED_EXIT_CODE)
    except Exception as exc:  # a bug or a crash on this rank: named once, and the job stops now, not at a timeout
        report_failure(exc)
        raise
    return 0


def one_fold(config):
    """train.py --debug of a cross-validation config: its first fold (cv.fold, when not set)."""
    if not config.cv.folds or config.cv.fold is not None:
        return config
    print("debug: cv.folds is set: checking fold 0 (cv.fold=0)", flush=True)
    return replace(config, cv=replace(config.cv, fold=0))


def predict_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = _parser("Write a submission CSV from a checkpoint (sharded over all launched processes).",
                     "YAML or JSON config (default: the checkpoint's own config.yaml); it may change data and inference "
                     "keys, not those that shape the model", prog=prog)
    parser.add_argument("--checkpoint", required=True, nargs="+",
                        help=f"{CHECKPOINT_FORMS}, or a weights file; several: their predictions are averaged into one "
                             f"submission")
    parser.add_argument("--last", action="store_true", help=LAST_HELP)
    parser.add_argument("--output", help="submission path (default: inference.output or <output_dir>/submission.csv)")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="val: predict the labelled validation split and write its metrics beside the CSV")
    args = parser.parse_intermixed_args(argv)
    die_with_launcher()
    try:
        # `--checkpoint a b key=value`: the checkpoint list ends where the overrides start
        moved = [c for c in args.checkpoint if "=" in c and not os.path.exists(c)]
        checkpoints = [c for c in args.checkpoint if c not in moved]
        if not checkpoints:
            parser.error("--checkpoint needs at least one checkpoint")
        from dist_train.commands.inference import checkpoint_config_file, predict, resolve_weights

        config_file = args.config
        if config_file is None:
            config_file = checkpoint_config_file(checkpoints[0], last=args.last)
            if config_file is None:
                resolve_weights(checkpoints[0])  # says so when there is nothing at all
                raise ConfigError(f"--checkpoint {checkpoints[0]} has no config.yaml beside it (a bare weights file): name "
                                  f"the config it was trained with, --config X.yaml")
        config = load_config(config_file, [*args.overrides, *moved])
        prestart_worker_server(config.data)

        predict(config, checkpoints, args.output, args.split, last=args.last)
    except DistTrainError as exc:
        fail(exc)
    except Exception as exc:
        report_failure(exc)
        raise
    return 0


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dist-train export",
        description="Export a checkpoint's model (EMA weights when it has them, as inference.weights says) with its "
                    "preprocessing in a JSON beside it, then check the file with onnxruntime against PyTorch.")
    parser.add_argument("--checkpoint", required=True,
                        help=f"{CHECKPOINT_FORMS}; a cross-validation run is exported as one graph averaging its folds "
                             f"(with the flip TTA when its inference.tta is hflip)")
    parser.add_argument("--last", action="store_true", help=LAST_HELP)
    parser.add_argument("--format", choices=["onnx"], default="onnx")
    parser.add_argument("--output", help="the file to write (default: <run>/export/<checkpoint step>.onnx); its .json beside it")
    parser.add_argument("--images", type=int, default=32, help="validation images the check runs (default 32)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest |logit difference| accepted between onnxruntime and PyTorch (default 1e-4)")
    parser.add_argument("--check-only", action="store_true", help="check an existing export (--output, or the default) again, write nothing")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="changes to the checkpoint's config, e.g. data.root=/data/digits (where the data is now)")
    args = parser.parse_intermixed_args(argv)
    try:
        from dist_train.commands.export import export

        export(args.checkpoint, args.output, args.overrides, args.images, args.tolerance, args.check_only, last=args.last)
    except DistTrainError as exc:
        fail(exc)
    return 0


def soup_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dist-train soup",
        description="Average the folds of a cross-validation run into one model (a uniform weight soup; BatchNorm "
                    "statistics recomputed on the training table), written as a checkpoint that predict.py and "
                    "dist-train export take; scored beside the fold ensemble and each fold.")
    parser.add_argument("--checkpoint", required=True, help="the cross-validation run's directory (its folds' best), or "
                                                             "a study's whose best trial is one")
    parser.add_argument("--last", action="store_true", help="the folds' last checkpoints instead of their best")
    parser.add_argument("--output", required=True, help="the checkpoint directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output when it exists")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="changes to the run's config: data.root=... (where the data is now), data.val=TABLE (score "
                             "the soup, the ensemble and each fold on labelled rows none of the folds trained on)")
    args = parser.parse_intermixed_args(argv)
    try:
        from dist_train.commands.soup import soup

        soup(args.checkpoint, args.output, args.overrides, overwrite=args.overwrite, last=args.last)
    except DistTrainError as exc:
        fail(exc)
    return 0


if __name__ == "__main__":
    exit_process(train_main())
