"""Cross-validation end to end on the competition's layout (configs/masks.yaml on a small synthetic set): real runs of
2 processes (and 1), the out-of-fold predictions against scikit-learn, the fold ensemble against the single folds, a
fold killed and resumed, predictions from a checkpoint's own config, and the folds as a SLURM job array."""
from __future__ import annotations

import csv
import json
import os
import subprocess

import numpy as np
import pytest
import slurm
from conftest import BIN, ROOT, assert_killed, config_path, read_jsonl, run_cli, run_env
from sklearn.metrics import accuracy_score, f1_score

from dist_train.commands.cli import predict_main
from dist_train.data import synthetic
from dist_train.job.faults import FAULT_ENV

CLASSES = [str(c) for c in range(18)]


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    return synthetic.write_masks(tmp_path_factory.mktemp("data") / "masks", people=16, eval_people=4, size=16)


def cv_args(root, out, config="masks.yaml", **extra) -> list[str]:
    """configs/masks.yaml made small: 2 folds of 8 people, 16x16 photos, an MLP (the same on 1 and 2 processes: no
    BatchNorm), 2 epochs of 4 steps at a global batch of 16, a save every 3 steps."""
    values = {"data.root": root, "data.image_size": 16, "data.num_workers": 0, "data.batch_size": 8, "model.name": "mlp",
              "model.width": 32, "cv.folds": 2, "train.epochs": 2, "checkpoint.every_n_steps": 3, "tracking.images": "false",
              "train.log_every_n_steps": 1, "train.distributed_timeout_s": 120, "output_dir": out, **extra}
    return ["--config", config_path(config), *[f"{k}={v}" for k, v in values.items()]]


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def person(path: str) -> str:
    return path.split("/")[1]


@pytest.fixture(scope="module")
def two_processes(masks, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv2") / "run"
    return out, run_cli("train.py", cv_args(masks, out), processes=2)


@pytest.fixture(scope="module")
def one_process(masks, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv1") / "run"
    run_cli("train.py", cv_args(masks, out, **{"data.batch_size": 16}))
    return out


def test_oof_holds_every_training_row_once_from_the_fold_that_held_it_out(two_processes, masks):
    out, proc = two_processes
    table, oof = rows(masks / "train" / "labels.csv"), rows(out / "oof.csv")
    assert [r["id"] for r in oof] == [r["path"] for r in table]  # each row once, in the table's order
    assert [r["target"] for r in oof] == [r["label"] for r in table]
    assert list(oof[0]) == ["id", "fold", "target", "prediction", *[f"prob_{c}" for c in CLASSES]]
    summary = json.loads((out / "cv_summary.json").read_text())
    for k in (0, 1):
        held = [r for r in oof if r["fold"] == str(k)]
        run_dir = out / f"fold-{k}"
        info = json.loads((run_dir / "run_info.json").read_text())
        # the fold trained on the other rows only, no person on both sides, on 2 ranks ending with the same weights
        assert {person(r["id"]) for r in held}.isdisjoint({person(r["id"]) for r in oof if r["fold"] != str(k)})
        assert (info["train_samples"], info["val_samples"]) == (len(table) - len(held), len(held)) == (56, 56)
        assert info["num_processes"] == 2 and len(set(info["final_weights_sha256_per_rank"])) == 1
        # its rows were predicted by its best checkpoint: the scores of its best evaluation
        best = max(read_jsonl(run_dir / "metrics.jsonl"), key=lambda r: r["val_f1_macro"])
        y, p = [r["target"] for r in held], [r["prediction"] for r in held]
        fold = summary["per_fold"][k]
        assert fold["val_accuracy"] == pytest.approx(accuracy_score(y, p)) == pytest.approx(best["val_accuracy"])
        assert fold["val_f1_macro"] == pytest.approx(best["val_f1_macro"], rel=1e-9)
        assert fold["val_loss"] == pytest.approx(best["val_loss"], rel=1e-6)
    # the OOF metrics are scikit-learn's on oof.csv
    y, p = [r["target"] for r in oof], [r["prediction"] for r in oof]
    probabilities = np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in oof])
    assert summary["oof"]["val_accuracy"] == pytest.approx(accuracy_score(y, p))
    assert summary["oof"]["val_f1_macro"] == pytest.approx(f1_score(y, p, labels=CLASSES, average="macro", zero_division=0))
    assert probabilities.sum(1) == pytest.approx(np.ones(len(oof)), abs=1e-4)
    assert [CLASSES[i] for i in probabilities.argmax(1)] == p
    assert summary["mean"]["val_accuracy"] == pytest.approx(np.mean([f["val_accuracy"] for f in summary["per_fold"]]))
    table_lines = [line for line in proc.stdout.splitlines() if line.split()[:1] in (["0"], ["1"], ["mean"], ["oof"])]
    assert len(table_lines) == 4 and f"{summary['oof']['val_accuracy']:.4f}" in table_lines[-1]


def test_two_processes_and_one_write_the_same_oof(two_processes, one_process):
    two, one = rows(two_processes[0] / "oof.csv"), rows(one_process / "oof.csv")
    assert [(r["id"], r["fold"], r["target"], r["prediction"]) for r in two] == \
           [(r["id"], r["fold"], r["target"], r["prediction"]) for r in one]
    assert np.array([[float(v) for k, v in r.items() if k.startswith("prob_")] for r in two]) == pytest.approx(
        np.array([[float(v) for k, v in r.items() if k.startswith("prob_")] for r in one]), abs=1e-5)
    assert json.loads((one_process / "fold-0" / "run_info.json").read_text())["num_processes"] == 1


def test_the_fold_ensemble_is_the_mean_of_the_folds_and_fills_info_csv(two_processes, masks, tmp_path):
    out, _ = two_processes
    info = rows(masks / "eval" / "info.csv")
    # without --config: the run's own config.yaml (the CV directory's, then each fold's)
    run_cli("predict.py", ["--checkpoint", str(out)], processes=2)
    submission = (out / "submission.csv").read_text().splitlines()
    assert submission[0] == "ImageID,ans" and [line.split(",")[0] for line in submission[1:]] == [r["ImageID"] for r in info]
    run_cli("predict.py", ["--checkpoint", str(out), "inference.probabilities=true", "--output", str(tmp_path / "all.csv")])
    singles = []
    for k in (0, 1):  # one fold's checkpoint, predicting that run's test set (not the digits of the defaults)
        run_cli("predict.py", ["--checkpoint", str(out / f"fold-{k}" / "checkpoints" / "best"), "inference.probabilities=true",
                               "--output", str(tmp_path / f"{k}.csv")])
        singles.append(np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows(tmp_path / f"{k}.csv")]))
        assert [r["ImageID"] for r in rows(tmp_path / f"{k}.csv")] == [r["ImageID"] for r in info]
    ensemble, mean = rows(tmp_path / "all.csv"), (singles[0] + singles[1]) / 2
    assert np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in ensemble]) == pytest.approx(mean, abs=2e-6)
    assert [r["ans"] for r in ensemble] == [CLASSES[i] for i in mean.argmax(1)] == [line.split(",")[1] for line in submission[1:]]


def test_a_key_that_shapes_the_model_is_refused_naming_both_values(two_processes, masks, capsys):
    out, _ = two_processes
    best = out / "fold-0" / "checkpoints" / "best"
    with pytest.raises(SystemExit) as exit_info:
        predict_main([*cv_args(masks, out, **{"model.width": 16}), "--checkpoint", str(out / "fold-0")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: model.width: the checkpoint {best} was trained with 32, the config asks for 16; a key that shapes the model "
        f"must be the checkpoint's own (predict.py without --config takes the checkpoint's config.yaml)")
    with pytest.raises(SystemExit):
        predict_main(["--checkpoint", str(out), "--split", "val"])
    assert f"its out-of-fold predictions are {out / 'oof.csv'}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_fold_killed_and_resumed_ends_bitwise_as_if_uninterrupted(two_processes, masks, tmp_path):
    reference, out = two_processes[0], tmp_path / "run"
    killed = run_cli("train.py", cv_args(masks, out), processes=2, check=False, env={FAULT_ENV: "kill@step:7"})
    assert_killed(killed)
    assert not (out / "fold-1").exists() and not (out / "oof.csv").exists()
    resumed = run_cli("train.py", [*cv_args(masks, out), "--resume", "auto"], processes=2)
    assert f"resumed from {out / 'fold-0' / 'checkpoints' / 'step-00000006'}" in resumed.stdout
    assert f"no checkpoint in {out / 'fold-1' / 'checkpoints'} yet: starting the run from the beginning" in resumed.stdout
    for k in (0, 1):
        ours, theirs = (json.loads((d / f"fold-{k}" / "run_info.json").read_text()) for d in (out, reference))
        assert ours["final_weights_sha256_per_rank"] == theirs["final_weights_sha256_per_rank"]
        assert ours["final_optimizer_sha256_per_rank"] == theirs["final_optimizer_sha256_per_rank"]
    assert (out / "oof.csv").read_bytes() == (reference / "oof.csv").read_bytes()
    # finished folds are skipped; the summary is the same
    again = run_cli("train.py", [*cv_args(masks, out), "--resume", "auto"], processes=2)
    assert again.stdout.count("is done: skipped") == 2 and "training" not in again.stdout
    assert (out / "oof.csv").read_bytes() == (reference / "oof.csv").read_bytes()
    strip = lambda s: {**s, "per_fold": [{k: v for k, v in f.items() if k != "wall_seconds"} for f in s["per_fold"]]}  # noqa: E731
    assert strip(json.loads((out / "cv_summary.json").read_text())) == strip(json.loads((reference / "cv_summary.json").read_text()))


def test_the_multihead_variant_scores_the_combined_class_like_sklearn(masks, tmp_path):
    out = tmp_path / "run"
    run_cli("train.py", cv_args(masks, out, config="masks_multihead.yaml", **{"data.batch_size": 16, "train.epochs": 1}))
    oof, table = rows(out / "oof.csv"), rows(masks / "train" / "labels.csv")
    # the combined class 6 mask + 3 gender + age band is the competition's label
    assert [r["target"] for r in oof] == [r["label"] for r in table]
    summary = json.loads((out / "cv_summary.json").read_text())
    y, p = [r["target"] for r in oof], [r["prediction"] for r in oof]
    assert summary["oof"]["val_accuracy"] == pytest.approx(accuracy_score(y, p))
    assert summary["oof"]["val_f1_macro"] == pytest.approx(f1_score(y, p, labels=CLASSES, average="macro", zero_division=0))
    mask = [str(int(c) // 6) for c in p]
    assert summary["oof"]["val_mask_accuracy"] == pytest.approx(accuracy_score([r["mask"] for r in table], mask))


# ----------------------------------------------------------------------------------------------
# a SLURM job array: one fold per task


reason = slurm.available()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = slurm.Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.mark.slow
@pytest.mark.skipif(reason is not None, reason=reason or "")
def test_two_folds_as_a_two_task_slurm_job_array(cluster, masks, one_process, tmp_path):
    out = tmp_path / "run"
    env = {**run_env(PATH=f"{BIN}:{os.environ['PATH']}"), "SLURM_CONF": str(cluster.conf), "JOIN_TIMEOUT_S": "120"}
    # quoted in a shell: the job expands $SLURM_ARRAY_TASK_ID, each task its own
    args = [*cv_args(masks, out, **{"data.batch_size": 16}), "cv.fold=$SLURM_ARRAY_TASK_ID"]
    proc = subprocess.run(["sbatch", "--parsable", "--array=0-1", "-N1", f"--output={tmp_path}/task-%a.log",
                           str(ROOT / "launch" / "slurm_train.sbatch"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True)
    job = proc.stdout.strip().split(";")[0]
    states = {}
    for task in (0, 1):
        seen: list[str] = []
        info = cluster.wait(f"{job}_{task}", {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=300, seen=seen)
        assert info["JobState"] == "COMPLETED", (tmp_path / f"task-{task}.log").read_text()[-4000:]
        states[task] = (info["NodeList"], seen)
    logs = [(tmp_path / f"task-{task}.log").read_text() for task in (0, 1)]
    assert f"fold 0 of 2 ({out / 'fold-0'}): training" in logs[0] and "fold 1 of 2 (" not in logs[0]
    assert f"fold 1 of 2 ({out / 'fold-1'}): training" in logs[1] and "fold 0 of 2 (" not in logs[1]
    assert {states[0][0], states[1][0]} == {"n1", "n2"}  # the two folds ran side by side, one per node
    assert any("cv: wrote" in log for log in logs)  # whichever finished last wrote the summary
    assert (out / "oof.csv").read_bytes() == (one_process / "oof.csv").read_bytes()
