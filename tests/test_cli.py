"""Entry points: bad input ends in one line naming the thing and exit code 2, never a traceback."""
import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, config_path, run_cli, tiny_overrides
from PIL import Image

from dist_train.commands.cli import predict_main, train_main
from dist_train.rundir import checkpoint as ckpt


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
    assert line == f"error: --checkpoint {tmp_path / 'nope'}: no such file or directory"


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", config_path("digits.yaml"), "optim.lrr=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config key optim.lrr; did you mean optim.lr?"


def test_single_process_train_with_python_then_resume(digits_root, tmp_path):
    """`python train.py` needs no launcher; --resume auto on a finished run trains nothing more; on a directory
    without a checkpoint yet (a requeued SLURM job that died before its first save) it starts, as a plain run."""
    def train(out, *extra, env=None):
        overrides = tiny_overrides(digits_root, out, **{"train.epochs": 1, "model.name": "mlp", "model.width": 8})
        return run_cli("train.py", ["--config", config_path("digits.yaml"), *overrides, *extra], env=env)

    plain = train(tmp_path / "plain")
    assert "1 process(es), DistributedType.NO" in plain.stdout
    given = train(tmp_path / "given", "--resume", "auto")
    requeued = train(tmp_path / "requeued", env={"SLURM_RESTART_COUNT": "1"})
    assert requeued.stdout.splitlines()[0] == "SLURM_RESTART_COUNT=1: continuing with --resume auto"
    for out, proc in ((tmp_path / "given", given), (tmp_path / "requeued", requeued)):
        assert f"no checkpoint in {out / 'checkpoints'} yet: starting the run from the beginning" in proc.stdout.splitlines()
        assert "resumed from" not in proc.stdout
        assert weights(out) == weights(tmp_path / "plain")
    assert "resumed from" in train(tmp_path / "plain", "--resume", "auto").stdout


def weights(run_dir):
    return json.loads((run_dir / "run_info.json").read_text())["final_weights_sha256_per_rank"]


def test_resume_auto_over_damaged_checkpoints_deletes_nothing(capsys, monkeypatch, tmp_path):
    """Checkpoints that all fail verification are no reason to start afresh (that would delete them): given or
    implied by a requeued SLURM job, --resume auto stops, naming them and --overwrite, and leaves every byte."""
    checkpoints = tmp_path / "checkpoints"
    for step in (10, 20):
        directory = checkpoints / ckpt.checkpoint_name(step)
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_bytes(b"weights" * 100)
        ckpt.write_manifest(directory)
        (directory / "model.safetensors").write_bytes(b"damaged" * 100)
    os.symlink("step-00000020", checkpoints / "last")
    (checkpoints / ".tmp-step-00000030").mkdir()  # what a save killed midway leaves: cleaned only by a run that goes on
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1").write_bytes(b"events")
    (tmp_path / "metrics.jsonl").write_text('{"step": 20}\n')
    before = contents(tmp_path)
    expected = (f"error: --resume auto: no checkpoint in {checkpoints} is intact (step-00000020, step-00000010: the "
                f"warnings above say why); nothing was deleted. Start the run afresh with --overwrite (it deletes "
                f"them), or choose another output_dir=...")
    for argv, restarts in (([f"output_dir={tmp_path}", "--resume", "auto"], "0"), ([f"output_dir={tmp_path}"], "1")):
        monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
        with pytest.raises(SystemExit) as exit_info:
            train_main(argv)
        out, err = capsys.readouterr()
        assert exit_info.value.code == 2 and err.splitlines() == [expected]
        assert "file model.safetensors is corrupt (sha256 mismatch); no older one to fall back to" in out
        assert contents(tmp_path) == before


def contents(root):
    """Every path under `root`: a file's bytes, a link's target, or a directory."""
    return {str(p.relative_to(root)): os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
            for p in root.rglob("*")}
