"""The `dist-train` command (also `python -m dist_train`): `new DIR` writes a ready project of your own model,
dataset and loss; `train ...` / `predict ...` are train.py / predict.py, so that
`accelerate launch ... -m dist_train train --config X` works wherever dist_train is installed; `export ...` writes a
checkpoint's model (or a cross-validation run's folds) as ONNX (export.py); `soup ...` averages a cross-validation run's
folds into one checkpoint (soup.py); `--version` prints the versions, one line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dist_train.commands.versions import PrintVersion

TEMPLATE = Path(__file__).parents[1] / "templates" / "project"
FILES = ("config.yaml", "model.py", "dataset.py", "loss.py", "test_smoke.py", "README.md", "accelerate_config.yaml")
"""What a new project holds, besides its example data in data/."""


def new_project(directory: Path) -> list[str]:
    """Write the template into `directory` (new or empty) and scikit-learn's digits into its data/ as example
    data; returns what was written."""
    from dist_train.data.digits import materialize_digits
    from dist_train.errors import DistTrainError

    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise DistTrainError(f"{directory} already exists and is not empty; choose a new directory (nothing was written)")
    directory.mkdir(parents=True, exist_ok=True)
    for file in FILES:
        text = (TEMPLATE / file).read_text()
        for key, value in {"name": directory.name}.items():
            text = text.replace("{" + key + "}", value)
        (directory / file).write_text(text)
    materialize_digits(directory / "data")
    return [*FILES, "data/"]


COMMANDS = {
    "new": "write a ready project: config.yaml, model.py, dataset.py, loss.py, a smoke test, a README and example data",
    "train": "train, cross-validate or search (train.py's arguments; accelerate launch ... -m dist_train train ...)",
    "predict": "write one submission from a checkpoint, a run, a cross-validation run or a study (predict.py's arguments)",
    "export": "a checkpoint's model, or a cross-validation run's folds as one ensemble, as ONNX checked against PyTorch",
    "soup": "average a cross-validation run's folds into one checkpoint (a weight soup), scored beside the ensemble",
    "shards": "write a split as a shard set (a few large files; a directory or s3://) to train and predict from",
}
"""Every command of `dist-train`, with the line its --help lists."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["train"], ["predict"]):
        from dist_train.commands.cli import exit_process, predict_main, train_main

        run = train_main if argv[0] == "train" else predict_main
        exit_process(run(argv[1:], prog=f"dist-train {argv[0]}"))
    if argv[:1] == ["export"]:
        from dist_train.commands.cli import export_main

        return export_main(argv[1:])
    if argv[:1] == ["shards"]:
        from dist_train.commands.shards import main as shards_main

        return shards_main(argv[1:])
    if argv[:1] == ["soup"]:
        from dist_train.commands.cli import soup_main

        return soup_main(argv[1:])
    parser = argparse.ArgumentParser(prog="dist-train", description="dist_train's commands; `dist-train COMMAND --help` "
                                                                    "says each one's arguments.")
    parser.add_argument("--version", action=PrintVersion)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, line in COMMANDS.items():
        command = commands.add_parser(name, help=line, description=line, add_help=name == "new")
        if name == "new":
            command.add_argument("directory", help="the project directory to create (new or empty)")
    args = parser.parse_args(argv)

    from dist_train.errors import DistTrainError

    project = args.directory.rstrip("/") or args.directory
    try:
        written = new_project(Path(project))
    except DistTrainError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"created {project}/: {', '.join(written)} (example data: scikit-learn's digits)\n"
          f"next, from here:\n"
          f"  pytest {project}    # your parts train two short epochs and predict\n"
          f"  accelerate launch --config_file {project}/accelerate_config.yaml --num_processes 2 -m dist_train train "
          f"--config {project}/config.yaml\n"
          f"then make it yours: model.py, dataset.py, loss.py, config.yaml ({project}/README.md)", flush=True)
    return 0
