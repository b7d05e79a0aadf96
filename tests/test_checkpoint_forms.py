"""One command line: every form `--checkpoint` takes (a checkpoint, a run, a cross-validation run, a study, a weights file)
read the same way by predict, export, soup, distill.teacher and model.pretrained (config.locate), each refusing the
forms it cannot use in one line; `dist-train --help` and `--version`; a cross-validation run exported as one ONNX
ensemble equal to predict.py's average. Tiny digits runs (an MLP, 1 epoch) shared by the module."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import config_path, run_cli, tiny_overrides

import dist_train
from dist_train.commands import scaffold
from dist_train.commands.cli import export_main, predict_main, soup_main, train_main
from dist_train.commands.distill import find_teacher
from dist_train.commands.export import export
from dist_train.commands.inference import predict, predict_split
from dist_train.commands.scaffold import COMMANDS
from dist_train.config import load_config
from dist_train.config.locate import locate
from dist_train.config.pretrained import describe_weights, weights_file
from dist_train.data.datasets import build_dataset
from dist_train.data.splits import load_test_records
from dist_train.errors import ConfigError, DistTrainError

TINY = {"model.name": "mlp", "model.width": 8, "train.epochs": 1, "tracking.images": "false"}


def args(digits_root, out, **extra) -> list[str]:
    return ["--config", config_path("digits.yaml"), *tiny_overrides(digits_root, out, **{**TINY, **extra})]


@pytest.fixture(scope="module")
def runs(digits_root, tmp_path_factory) -> dict[str, Path]:
    """A hold-out run, a 2-fold cross-validation run and a 2-trial study of hold-out runs; each form's path."""
    root = tmp_path_factory.mktemp("forms")
    run_cli("train.py", args(digits_root, root / "run"))
    run_cli("train.py", args(digits_root, root / "cv", **{"cv.folds": 2, "data.val": "null"}))
    run_cli("train.py", args(digits_root, root / "study", **{"hpo.trials": 2, "hpo.space.optim.lr": "{type: categorical, choices: [0.001, 0.01]}"}))
    return {"checkpoint": root / "run" / "checkpoints" / "best", "run": root / "run", "cv": root / "cv",
            "study": root / "study", "weights": root / "run" / "checkpoints" / "best" / "model.safetensors"}


def test_each_form_is_read_the_same_way(runs):
    study = json.loads((runs["study"] / "hpo_summary.json").read_text())["best"]
    expected = {
        "checkpoint": ("checkpoint", [runs["checkpoint"]], "a checkpoint"),
        "run": ("run", [runs["run"] / "checkpoints" / "best"], "a run: its best checkpoint, step-"),
        "cv": ("cv", [runs["cv"] / f"fold-{k}" / "checkpoints" / "best" for k in (0, 1)],
               "a cross-validation run: the best checkpoints of its 2 folds"),
        "study": ("study", [runs["study"] / study["dir"] / "checkpoints" / "best"],
                  f"a study: its best trial, {runs['study'] / study['dir']} (val_accuracy {study['value']:.4f}), a run"),
        "weights": ("weights", [runs["weights"]], "a weights file"),
    }
    for form, (name, checkpoints, said) in expected.items():
        found = locate(runs[form])
        assert (found.form, list(found.checkpoints)) == (name, checkpoints), form
        assert found.line().startswith(f"--checkpoint {runs[form]}: {said}"), found.line()
    assert locate(runs["run"], last=True).checkpoints == (runs["run"] / "checkpoints" / "last",)
    assert locate(runs["cv"], last=True).checkpoints[1] == runs["cv"] / "fold-1" / "checkpoints" / "last"
    with pytest.raises(DistTrainError, match=r"--checkpoint .*nothing: not a checkpoint, a run, a cross-validation run"):
        (runs["run"] / "nothing").mkdir()
        locate(runs["run"] / "nothing")


def test_a_study_without_a_trial_and_a_directory_of_two_runs_are_named(runs, tmp_path):
    study, both = tmp_path / "study", tmp_path / "both"
    study.mkdir()
    (study / "config.yaml").write_text((runs["study"] / "config.yaml").read_text())  # what a study writes first
    with pytest.raises(DistTrainError, match=r"is a study without a complete trial yet \(no hpo_summary.json\)"):
        locate(study)
    both.mkdir()
    (both / "checkpoints").mkdir()  # an output_dir used for a hold-out run, then for cv.folds
    (both / "config.yaml").write_text((runs["cv"] / "config.yaml").read_text())
    with pytest.raises(DistTrainError, match=r"holds a run's checkpoints/ and a cross-validation run's config.yaml"):
        locate(both)


@pytest.mark.parametrize("form", ["checkpoint", "run", "cv", "study", "weights"])
def test_predict_takes_every_form_and_says_what_it_read(runs, digits_root, form, tmp_path, capsys):
    config = load_config(config_path("digits.yaml"), tiny_overrides(digits_root, tmp_path, **TINY))
    predict(config, runs[form], tmp_path / "submission.csv")
    printed = capsys.readouterr().out
    assert f"--checkpoint {runs[form]}: {locate(runs[form]).said}" in printed
    assert ("averaging 2 checkpoints" in printed) if form == "cv" else ("averaging" not in printed)
    assert len((tmp_path / "submission.csv").read_text().splitlines()) == 271


COMMAND_FORMS = {  # command -> form -> None (taken) or the refusal's words
    "export": {"checkpoint": None, "run": None, "cv": None, "study": None,
               "weights": "is a weights file; this takes a checkpoint, a run, a cross-validation run or a study directory"},
    "soup": {"checkpoint": "is a checkpoint directory; this takes a cross-validation run's directory",
             "run": "is a run directory; this takes a cross-validation run's directory",
             "study": "is a study's directory (its best trial is a run directory); this takes a cross-validation run's",
             "weights": "is a weights file; this takes a cross-validation run's directory", "cv": None},
    "distill.teacher": {"checkpoint": None, "run": None, "cv": None, "study": None, "weights": None},  # (its config.yaml beside it)
    "model.pretrained": {"checkpoint": None, "run": None, "study": None, "weights": None,
                         "cv": "is a cross-validation run's directory; this takes weights (a file, or a folder holding "
                               "model.safetensors), a checkpoint or a run directory (its best); of a cross-validation run "
                               "name one fold"},
}


@pytest.mark.parametrize("command", list(COMMAND_FORMS))
def test_every_command_takes_its_forms_and_refuses_the_others_in_one_line(runs, digits_root, command, tmp_path, capsys):
    for form, refusal in COMMAND_FORMS[command].items():
        path = runs[form]
        if command == "export":
            call = lambda: export(path, tmp_path / f"{form}.onnx", [f"data.root={digits_root}"], images=8,  # noqa: E731
                                  log=lambda m: None)
        elif command == "soup":
            call = lambda: soup_main(["--checkpoint", str(path), "--output", str(tmp_path / form)])  # noqa: E731
        elif command == "distill.teacher":
            config = load_config(config_path("digits.yaml"), tiny_overrides(digits_root, tmp_path, **TINY,
                                                                            **{"distill.teacher": path}))
            call = lambda: find_teacher(config)  # noqa: E731
        else:
            call = lambda: weights_file(path)  # noqa: E731
        if refusal is None:
            if command == "soup":
                assert call() == 0
                assert (tmp_path / form / "model.safetensors").is_file()
            else:
                call()
            continue
        if command == "soup":
            with pytest.raises(SystemExit) as stopped:
                call()
            said = capsys.readouterr().err
            assert stopped.value.code == 2
            assert said.count("\n") == 1 and refusal in said, said
        else:
            with pytest.raises(ConfigError, match=re.escape(refusal)):
                call()
    if command == "distill.teacher":  # a weights file without its config.yaml: nothing says what model it is
        bare = tmp_path / "bare" / "teacher.safetensors"
        bare.parent.mkdir()
        bare.write_bytes(runs["weights"].read_bytes())
        config = load_config(config_path("digits.yaml"), tiny_overrides(digits_root, tmp_path, **TINY,
                                                                        **{"distill.teacher": bare}))
        with pytest.raises(ConfigError, match=re.escape(f"distill.teacher {bare}: no config.yaml in {bare.parent}")):
            find_teacher(config)
    if command == "model.pretrained":
        study = json.loads((runs["study"] / "hpo_summary.json").read_text())["best"]["dir"]
        assert weights_file(runs["study"]) == runs["study"] / study / "checkpoints" / "best" / "model.safetensors"
        assert weights_file(runs["run"]) == runs["run"] / "checkpoints" / "best" / "model.safetensors"
        assert describe_weights(runs["run"]) == (f"a run: its best checkpoint, {(runs['run'] / 'checkpoints' / 'best').resolve().name}: "
                                                 f"its weights {runs['run'] / 'checkpoints' / 'best' / 'model.safetensors'}")


def test_dist_train_lists_every_command_and_each_says_its_own_usage(capsys):
    def run(main, *argv) -> str:
        with pytest.raises(SystemExit) as ended:
            main(list(argv))
        assert ended.value.code in (0, None)
        return capsys.readouterr().out

    listing = run(scaffold.main, "--help")
    for name, line in COMMANDS.items():
        assert re.search(rf"^\s+{name}\s+{re.escape(line.split()[0])}", listing, re.M), (name, listing)
    assert set(COMMANDS) == {"new", "train", "predict", "export", "soup", "shards"}
    for name in ("train", "predict", "export", "soup", "shards"):
        assert run(scaffold.main, name, "--help").startswith(f"usage: dist-train {name} ")
    assert run(train_main, "--help").startswith("usage: ")  # train.py / predict.py: their own script's name
    versions = {run(scaffold.main, "--version"), run(train_main, "--version"), run(predict_main, "--version")}
    assert len(versions) == 1
    (line,) = versions
    assert line.startswith(f"dist_train {dist_train.__version__} (")
    assert re.fullmatch(r"dist_train \S+ \(torch \S+, torchvision \S+, accelerate \S+, Python \S+, \S+ \S+\)\n", line), line


def test_a_cross_validation_run_exports_as_one_graph_equal_to_predicts_ensemble(runs, digits_root, tmp_path, capsys):
    import onnxruntime

    path = tmp_path / "ensemble.onnx"
    assert export_main(["--checkpoint", str(runs["cv"]), "--output", str(path), f"data.root={digits_root}",
                        "inference.tta=hflip"]) == 0
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["output"]["ensemble"]["tta"] == "hflip" and len(info["output"]["ensemble"]["folds"]) == 2
    assert info["check"]["argmax_agreement"] == info["check"]["images"]

    # predict.py's average of the two folds (with flip TTA) on the test images, against onnxruntime on the same images
    config = load_config(runs["cv"] / "config.yaml", [f"data.root={digits_root}", "inference.tta=hflip", "cv.folds=0",
                                                       "data.num_workers=0"])
    prediction = predict_split(config, runs["cv"], split="test")
    dataset = build_dataset(load_test_records(config.data), config.data, "test", config.seed)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = torch.from_numpy(session.run(["logits"], {"images": images})[0])
    expected = prediction.outputs.float().softmax(1)
    assert (exported.softmax(1) - expected).abs().max().item() < 1e-5
    assert np.array_equal(exported.argmax(1).numpy(), expected.argmax(1).numpy())

    capsys.readouterr()
    assert export_main(["--checkpoint", str(runs["cv"]), "--output", str(path), f"data.root={digits_root}",
                        "inference.tta=hflip", "--check-only"]) == 0
    assert f"checked {path}: onnxruntime vs PyTorch on 32 validation images" in capsys.readouterr().out
