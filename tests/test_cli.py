"""Entry points: bad input ends in one line naming the thing and exit code 2, never a traceback."""
import csv
import subprocess
import sys

import pytest
from conftest import ROOT, config_path, run_cli, tiny_overrides
from PIL import Image

from dist_train.commands.cli import predict_main, train_main


def error_of(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_config_file(capsys, tmp_path):
    assert error_of(train_main, ["--config", str(tmp_path / "x.yaml")], capsys) == f"error: config file not found: {tmp_path / 'x.yaml'}"


def test_unknown_override_key(capsys):
    assert error_of(train_main, ["data.batch_sise=3"], capsys) == "error: unknown config key data.batch_sise; did you mean data.batch_size?"


def csv_run(tmp_path, header, labels):
    (tmp_path / "img").mkdir()
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, label in enumerate(labels):
            Image.new("RGB", (4, 4)).save(tmp_path / "img" / f"{i}.png")
            w.writerow([f"img/{i}.png", label])
    return ["data.source=csv", f"data.root={tmp_path}", "data.val=null", "data.test=null", "data.channels=3",
            "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", f"output_dir={tmp_path / 'run'}", "data.num_workers=0"]


def test_csv_missing_column_through_train_py(capsys, tmp_path):
    args = csv_run(tmp_path, ["image", "target"], ["a", "b"] * 5)
    line = error_of(train_main, args, capsys)
    assert line == f"error: {tmp_path / 'train.csv'}: missing column 'label'; columns found: image, target"


def test_label_outside_classes_through_train_py(capsys, tmp_path):
    args = csv_run(tmp_path, ["image", "label"], ["a", "b"] * 5 + ["c"]) + ["data.classes=[a, b]"]
    assert "row 11 has label 'c', which is not one of the 2 classes (a, b)" in error_of(train_main, args, capsys)


def test_existing_run_is_not_overwritten_silently(capsys, tmp_path):
    (tmp_path / "checkpoints" / "step-00000020").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000020" / "manifest.json").write_text("{}")
    line = error_of(train_main, [f"output_dir={tmp_path}"], capsys)
    assert "already holds a run; continue it with --resume auto, or pass --overwrite" in line


def test_predict_without_checkpoint(capsys, tmp_path):
    line = error_of(predict_main, ["--checkpoint", str(tmp_path / "nope")], capsys)
    assert line == f"error: --checkpoint {tmp_path / 'nope'}: no weights at {tmp_path / 'nope'}"


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", config_path("digits.yaml"), "optim.lrr=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config key optim.lrr; did you mean optim.lr?"


def test_single_process_train_with_python_then_resume(digits_root, tmp_path):
    """`python train.py` needs no launcher; --resume auto on a finished run trains nothing more."""
    args = ["--config", config_path("digits.yaml"), *tiny_overrides(digits_root, tmp_path, **{"train.epochs": 1})]
    proc = run_cli("train.py", args)
    assert "1 process(es), DistributedType.NO" in proc.stdout
    assert "resumed from" in run_cli("train.py", [*args, "--resume", "auto"]).stdout
