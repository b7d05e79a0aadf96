"""`dist-train new DIR` (or `python -m dist_train new DIR`): a ready project of your own model, dataset and loss."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

TEMPLATE = Path(__file__).parent / "templates" / "project"
FILES = ("config.yaml", "model.py", "dataset.py", "loss.py", "test_smoke.py", "README.md", "accelerate_config.yaml")
"""What a new project holds, besides its example data in data/."""


def script(name: str) -> str:
    """train.py or predict.py: beside the package in a dist_train checkout (pip install -e)."""
    path = Path(__file__).resolve().parent.parent / name
    return str(path) if path.is_file() else f"<dist_train checkout>/{name}"


def new_project(directory: Path) -> list[str]:
    """Write the template into `directory` (new or empty) and scikit-learn's digits into its data/ as example
    data; returns what was written."""
    from dist_train.data import materialize_digits
    from dist_train.errors import DistTrainError

    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise DistTrainError(f"{directory} already exists and is not empty; choose a new directory (nothing was written)")
    directory.mkdir(parents=True, exist_ok=True)
    for file in FILES:
        text = (TEMPLATE / file).read_text()
        for key, value in {"name": directory.name, "train_py": script("train.py"), "predict_py": script("predict.py")}.items():
            text = text.replace("{" + key + "}", value)
        (directory / file).write_text(text)
    materialize_digits(directory / "data")
    return [*FILES, "data/"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dist-train", description="dist_train's project tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="write a ready project: config.yaml, model.py, dataset.py, loss.py, a smoke "
                                          "test, a README and example data")
    new.add_argument("directory", help="the project directory to create (new or empty)")
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
          f"  accelerate launch --config_file {project}/accelerate_config.yaml --num_processes 2 {script('train.py')} "
          f"--config {project}/config.yaml\n"
          f"then make it yours: model.py, dataset.py, loss.py, config.yaml ({project}/README.md)", flush=True)
    return 0
