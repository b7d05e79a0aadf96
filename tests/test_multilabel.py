"""Multi-label images (task.kind=multilabel): labels, losses, metrics and tuned thresholds against scikit-learn, timm,
torchvision and brute force; then real runs on the synthetic digit tiles -- 1 and 2 processes, cross-validation with
thresholds tuned on the out-of-fold predictions, and every tool that exists (accumulation, mixup, EMA, TTA, fold
ensembles and soups, distillation, pseudo-labels, HPO, ONNX export, --debug, the Trainer API)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import read_jsonl, run_cli
from sklearn.metrics import (accuracy_score, average_precision_score, f1_score, fbeta_score, hamming_loss,
                             precision_score, recall_score)
from timm.loss import AsymmetricLossMultiLabel
from torchvision.ops import sigmoid_focal_loss

from dist_train.config import load_config, model_shaping_differences
from dist_train.data import synthetic
from dist_train.data.columns import Column
from dist_train.data.mixing import mix_batch
from dist_train.errors import ConfigError, DataError
from dist_train.models.distill import Distillation
from dist_train.models.losses import build_multilabel_loss
from dist_train.models.metrics import multilabel_metrics, tune_thresholds
from dist_train.models.networks import read_weights
from dist_train.models.tasks import build_task, fit_labels

ROOT_CONFIG = ["data.source=csv", "task.kind=multilabel", "data.label_column=labels"]


def task_of(*overrides, classes=("0", "1", "2", "3")):
    config = load_config(None, [*ROOT_CONFIG, *overrides])
    return build_task(config, {"multilabel": list(classes)})


def scores(seed=0, rows=60, classes=4):
    """Probabilities loosely following random multi-hot targets (every class has positives and negatives)."""
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(rows, classes, generator=generator) < 0.35).float()
    targets[0], targets[1] = 1.0, 0.0
    probabilities = (0.6 * targets + 0.7 * torch.rand(rows, classes, generator=generator)).clamp(0, 1)
    return probabilities, targets


# --- metrics and thresholds ---------------------------------------------------------------------


def test_metrics_are_scikit_learns_on_hand_made_predictions():
    probabilities, targets = scores()
    thresholds = np.array([0.5, 0.4, 0.6, 0.55])
    metrics = multilabel_metrics(probabilities, targets, thresholds)
    y, p = targets.numpy().astype(int), probabilities.double().numpy()
    predicted = (p >= thresholds).astype(int)
    assert metrics["val_map_macro"] == pytest.approx(average_precision_score(y, p, average="macro"))
    assert metrics["val_map_micro"] == pytest.approx(average_precision_score(y, p, average="micro"))
    assert metrics["per_class_ap"] == pytest.approx(list(average_precision_score(y, p, average=None)))
    for average in ("macro", "micro"):
        assert metrics[f"val_f1_{average}"] == pytest.approx(f1_score(y, predicted, average=average, zero_division=0))
    assert ((y.sum(1) == 0) & (predicted.sum(1) == 0)).any()  # a row with nothing true and nothing predicted scores 1
    assert metrics["val_f1_samples"] == pytest.approx(f1_score(y, predicted, average="samples", zero_division=1))
    assert metrics["val_precision_macro"] == pytest.approx(precision_score(y, predicted, average="macro", zero_division=0))
    assert metrics["val_recall_macro"] == pytest.approx(recall_score(y, predicted, average="macro", zero_division=0))
    assert metrics["val_hamming_loss"] == pytest.approx(hamming_loss(y, predicted))
    assert metrics["val_exact_match"] == pytest.approx(accuracy_score(y, predicted))
    assert metrics["thresholds"] == thresholds.tolist() and metrics["val_samples"] == 60


def test_a_class_without_positives_is_left_out_of_map_and_an_empty_row_predicted_empty_scores_one():
    probabilities = torch.tensor([[0.9, 0.1, 0.2], [0.2, 0.8, 0.1], [0.1, 0.2, 0.3]])
    targets = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 0]])
    metrics = multilabel_metrics(probabilities, targets, [0.5, 0.5, 0.5])
    assert metrics["per_class_ap"] == [1.0, 1.0, None] and metrics["val_map_macro"] == 1.0
    assert metrics["val_f1_samples"] == 1.0 and metrics["val_exact_match"] == 1.0
    # a class absent from the truth and never predicted has nothing to score; predicted, it scores 0
    assert metrics["val_f1_macro"] == metrics["val_precision_macro"] == metrics["val_recall_macro"] == 1.0
    predicted = multilabel_metrics(probabilities, targets, [0.5, 0.5, 0.25])
    assert predicted["val_f1_macro"] == pytest.approx(2 / 3) and predicted["val_precision_macro"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_tuned_thresholds_reach_the_best_f_beta_of_a_brute_force_search(beta):
    probabilities, targets = scores(seed=3, rows=40, classes=5)
    targets[:, 4] = 0.0  # a class without positives keeps the default
    thresholds = tune_thresholds(probabilities, targets, beta)
    y, p = targets.numpy().astype(int), probabilities.double().numpy()
    assert thresholds[4] == 0.5
    for c in range(4):
        candidates = np.unique(np.r_[p[:, c], 1.01])
        best = max(fbeta_score(y[:, c], p[:, c] >= t, beta=beta, zero_division=0) for t in candidates)
        reached = fbeta_score(y[:, c], p[:, c] >= thresholds[c], beta=beta, zero_division=0)
        assert reached == pytest.approx(best), c
        # the midpoint: no probability of these rows sits on the threshold
        assert not np.isclose(p[:, c], thresholds[c]).any()


# --- labels, losses, mixing, distillation ------------------------------------------------------


def test_labels_from_a_delimited_column_or_from_0_1_columns_with_one_line_per_bad_row():
    config = load_config(None, ROOT_CONFIG)
    columns = {"labels": Column.of(["3 10", "", "9  3", "1"])}
    assert fit_labels(config, columns) == {"multilabel": ["1", "3", "9", "10"]}  # numbers sort as numbers
    task = build_task(config, {"multilabel": ["1", "3", "9", "10"]})
    assert task.encode(columns, "t.csv").tolist() == [[0, 1, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0]]
    with pytest.raises(DataError, match=r"t.csv, column 'labels': row 2 has class '7', which is not one of the 4 classes"):
        task.encode({"labels": Column.of(["1", "3 7"])}, "t.csv")

    by_column = load_config(None, [*ROOT_CONFIG, "task.targets=[cat, dog]"])
    table = {"cat": Column.of(["1", "0", "1"]), "dog": Column.of(["0", "0", "1"])}
    assert fit_labels(by_column, table) == {"multilabel": ["cat", "dog"]}
    assert build_task(by_column, {"multilabel": ["cat", "dog"]}).encode(table, "t.csv").tolist() == [[1, 0], [0, 0], [1, 1]]
    with pytest.raises(DataError, match=r"t.csv, column 'dog': row 3 has '2', not 0 or 1"):
        build_task(by_column, {"multilabel": ["cat", "dog"]}).encode({**table, "dog": Column.of(["0", "1", "2"])}, "t.csv")


def test_losses_are_torchs_torchvisions_and_timms_per_sample():
    torch.manual_seed(0)
    logits, targets = torch.randn(8, 4), (torch.rand(8, 4) < 0.4).float()
    bce = task_of("loss.name=bce").loss()(logits, targets)
    assert bce.shape == (8,)
    torch.testing.assert_close(bce.mean(), F.binary_cross_entropy_with_logits(logits, targets))
    focal = task_of("loss.name=focal", "loss.focal_alpha=0.25").loss()(logits, targets)
    torch.testing.assert_close(focal.mean(), sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="mean"))
    asl = task_of("loss.name=asl").loss()(logits, targets)
    torch.testing.assert_close(asl.mean(), AsymmetricLossMultiLabel()(logits, targets))  # timm's batchmean
    smoothed = task_of("loss.name=bce", "loss.label_smoothing=0.2").loss()(logits, targets)
    torch.testing.assert_close(smoothed.mean(), F.binary_cross_entropy_with_logits(logits, targets * 0.8 + 0.1))

    # pos_weight=balanced: negatives / positives of each class, from the training table's counts (classes.json)
    config = load_config(None, [*ROOT_CONFIG, "loss.pos_weight=balanced"])
    task = build_task(config, {"multilabel": ["a", "b", "c", "d"], "positives": [10, 25, 50, 0], "rows": 100})
    expected = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=torch.tensor([9.0, 3.0, 1.0, 1.0]))
    torch.testing.assert_close(task.loss()(logits, targets).mean(), expected)
    with pytest.raises(ConfigError, match="task.kind=multilabel takes bce, focal, asl"):
        build_multilabel_loss(load_config(None, ["loss.name=f1"]).loss, 4)  # (a config says so at once: the checks below)


def test_mixup_mixes_multi_hot_targets_by_lambda():
    images, targets = torch.rand(6, 3, 8, 8), (torch.rand(6, 5) < 0.5).float()
    mixed, soft = mix_batch(images, targets, 5, mixup_alpha=0.4, cutmix_alpha=0.0, generator=torch.Generator().manual_seed(1))
    lam = ((mixed - images.flip(0)) / (images - images.flip(0))).flatten()[0].item()
    torch.testing.assert_close(soft, targets * lam + targets.flip(0) * (1 - lam))


def test_a_sigmoid_teacher_distils_with_the_gradient_of_bce_against_its_probabilities():
    config = load_config(None, [*ROOT_CONFIG, "distill.temperature=2.0", "distill.alpha=0.0"])
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4)
    distill = Distillation(config.distill, [4], [1.0], binary=True)
    loss = distill.loss(torch.zeros(5), student, teacher)
    assert distill.loss(torch.zeros(5), teacher, teacher).abs().max() < 1e-6  # nothing to learn from an equal teacher
    loss.sum().backward()
    reference = student.detach().clone().requires_grad_(True)
    bce = 4.0 * F.binary_cross_entropy_with_logits(reference / 2.0, torch.sigmoid(teacher / 2.0), reduction="none").mean(1)
    bce.sum().backward()
    torch.testing.assert_close(student.grad, reference.grad)


def test_averages_and_submissions_decode_back_to_the_thresholded_probabilities():
    task = task_of("task.threshold=0.4", classes=("cat", "dog", "owl"))
    a, b = torch.randn(7, 3), torch.randn(7, 3)
    averaged = task.average([a, b])
    torch.testing.assert_close(averaged.sigmoid(), (a.sigmoid() + b.sigmoid()) / 2)
    labels = task.predictions(averaged)
    present = averaged.sigmoid() >= 0.4
    assert [set(label.split()) for label in labels] == [{n for n, p in zip(task.class_names, row) if p} for row in present]
    assert task.target_labels(present.float()) == labels


def test_config_checks_name_the_key():
    for overrides, message in [
        (["loss.name=bce"], "loss.name=bce / loss.pos_weight are multi-label losses: set task.kind=multilabel"),
        ([*ROOT_CONFIG, "loss.name=f1"], "loss.name=f1 is a soft macro-F1 of one class per row"),
        ([*ROOT_CONFIG, "task.threshold=1.5"], "task.threshold must be in (0, 1) or tune"),
        ([*ROOT_CONFIG, "task.threshold=best"], "task.threshold: expected float or"),
        ([*ROOT_CONFIG, "checkpoint.monitor=val_accuracy"], "unknown metric 'val_accuracy' for task.kind=multilabel"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(None, overrides)
    config = load_config(None, [*ROOT_CONFIG, "task.threshold=tune"])
    assert (config.checkpoint.monitor, config.checkpoint.mode) == ("val_map_macro", "max")
    assert load_config(None, [*ROOT_CONFIG, "checkpoint.monitor=val_hamming_loss"]).checkpoint.mode == "min"
    saved = {"task": {"kind": "multilabel", "threshold": 0.5, "label_separator": "|"}}  # applied after the weights
    assert not model_shaping_differences(saved, config)
    with pytest.raises(ConfigError, match="task.kind=multilabel needs at least 2 classes, not \\['defect'\\]"):
        build_task(config, {"multilabel": ["defect"]})


# --- real runs ------------------------------------------------------------------------------------


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """300 synthetic images: train 210, val 45 (odd: 2 ranks get 23 and 22), test 45."""
    return synthetic.write_multilabel(tmp_path_factory.mktemp("data") / "multilabel", count=300)


def overrides(root, out, **extra) -> list[str]:
    values = {"data.root": root, "data.num_workers": 0, "data.batch_size": 16, "cv.folds": 0, "data.val": "val.csv",
              "train.epochs": 2, "train.log_every_n_steps": 1, "train.distributed_timeout_s": 120, "output_dir": out,
              "tracking.images": "false", **extra}
    return ["--config", "configs/multilabel.yaml", *[f"{k}={v}" for k, v in values.items()]]


@pytest.fixture(scope="module")
def holdout(tiles, tmp_path_factory):
    """2 processes, thresholds tuned on the validation split, mixup/CutMix and EMA: the run the inference tests read."""
    out = tmp_path_factory.mktemp("holdout")
    run_cli("train.py", overrides(tiles, out, **{"data.mixup_alpha": 0.2, "data.cutmix_alpha": 1.0,
                                                 "train.ema_decay": 0.9}), processes=2)
    return out


def test_the_gathered_metrics_are_the_same_on_one_and_two_processes(tiles, holdout, tmp_path):
    last = read_jsonl(holdout / "metrics.jsonl")[-1]
    assert last["rank_samples"] == [112, 112]  # 210 rows: 7 batches of 16 per rank, the last padded by repeats
    state = json.loads((holdout / "checkpoints" / "last" / "trainer_state.json").read_text())
    seen = []
    for processes in (1, 2):
        output = tmp_path / f"val{processes}.csv"
        run_cli("predict.py", ["--checkpoint", str(holdout / "checkpoints" / "last"), "--split", "val", "--output",
                               str(output), "data.num_workers=0"], processes=processes)
        seen.append(json.loads(output.with_suffix(".metrics.json").read_text()))
    assert seen[0]["val_samples"] == seen[1]["val_samples"] == 45  # 23 + 22 rows gathered: each once
    assert seen[0]["thresholds"] == seen[1]["thresholds"] == state["thresholds"]  # the checkpoint's tuned thresholds
    for key in ("val_loss", "val_map_macro", "val_map_micro", "val_f1_samples", "val_f1_macro", "val_hamming_loss"):
        assert seen[0][key] == pytest.approx(seen[1][key], abs=1e-6), key
        assert seen[0][key] == pytest.approx(last[key], abs=1e-5), key  # what the 2-process training reported


def test_the_submission_decodes_to_the_probabilities_at_the_checkpoints_thresholds(tiles, holdout, tmp_path):
    output = tmp_path / "submission.csv"
    proc = run_cli("predict.py", ["--checkpoint", str(holdout), "--output", str(output), "data.num_workers=0",
                                  "inference.probabilities=true", "inference.tta=hflip"], processes=2)
    assert f"thresholds: tuned on the validation split of {holdout / 'checkpoints' / 'best'}" in proc.stdout
    thresholds = json.loads((holdout / "checkpoints" / "best" / "trainer_state.json").read_text())["thresholds"]
    rows = read_rows(output)
    classes = [str(d) for d in range(10)]
    assert [r["id"] for r in rows] == [r["id"] for r in read_rows(tiles / "info.csv")]
    for row in rows:
        assert set(row["labels"].split()) == {c for c, t in zip(classes, thresholds) if float(row[f"prob_{c}"]) >= t}
    truth = {r["id"]: set(r["labels"].split()) for r in read_rows(tiles / "test_labels.csv")}
    assert np.mean([len(set(r["labels"].split()) & truth[r["id"]]) > 0 for r in rows]) > 0.5  # it learnt something


def test_export_writes_sigmoid_outputs_and_checks_the_label_sets(holdout, tmp_path):
    from dist_train.commands.export import export

    info = export(holdout / "checkpoints" / "best", tmp_path / "model.onnx", ["data.num_workers=0"], images=16, log=lambda m: None)
    assert info["check"]["label_set_agreement"] == 16 and info["check"]["max_abs_probability_difference"] < 1e-4
    thresholds = json.loads((holdout / "checkpoints" / "best" / "trainer_state.json").read_text())["thresholds"]
    assert list(info["output"]["thresholds"].values()) == thresholds and info["output"]["task"] == "multilabel"
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]


@pytest.fixture(scope="module")
def folds(tiles, tmp_path_factory):
    """2-fold cross-validation on 1 process, thresholds tuned on the out-of-fold predictions."""
    out = tmp_path_factory.mktemp("cv")
    run_cli("train.py", overrides(tiles, out, **{"cv.folds": 2, "data.val": "null", "train.epochs": 1}))
    return out


def test_cross_validation_tunes_thresholds_on_the_out_of_fold_rows_and_scores_each_fold_with_the_others(folds):
    summary = json.loads((folds / "cv_summary.json").read_text())
    saved = json.loads((folds / "thresholds.json").read_text())
    rows = read_rows(folds / "oof.csv")
    classes = [str(d) for d in range(10)]
    assert len(rows) == 210 and saved["classes"] == classes
    probabilities = torch.tensor([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    targets = torch.tensor([[float(c in r["target"].split()) for c in classes] for r in rows])
    fold = np.array([int(r["fold"]) for r in rows])
    np.testing.assert_allclose(saved["thresholds"], tune_thresholds(probabilities, targets), atol=1e-5)
    # nested: each fold's rows scored with the thresholds tuned on the other fold
    per_row = np.stack([tune_thresholds(probabilities[torch.as_tensor(fold != k)], targets[torch.as_tensor(fold != k)])
                        for k in (0, 1)])[fold]
    honest = multilabel_metrics(probabilities, targets, per_row)
    in_sample = multilabel_metrics(probabilities, targets, saved["thresholds"])
    assert summary["oof"]["val_f1_samples"] == pytest.approx(honest["val_f1_samples"], abs=1e-4)
    assert summary["oof_thresholds_in_sample"]["val_f1_samples"] == pytest.approx(in_sample["val_f1_samples"], abs=1e-4)
    assert summary["oof_thresholds_in_sample"]["val_f1_macro"] >= summary["oof"]["val_f1_macro"]  # tuned on itself
    assert summary["oof"]["val_map_macro"] == pytest.approx(honest["val_map_macro"], abs=1e-4)
    # oof.csv's predictions are the honest ones: each row at its fold's thresholds
    assert [set(r["prediction"].split()) for r in rows] == [{c for c, p, t in zip(classes, row, limits) if p >= t}
                                                           for row, limits in zip(probabilities.tolist(), per_row)]


def test_predict_averages_the_folds_and_uses_the_out_of_fold_thresholds_and_so_does_their_soup(tiles, folds, tmp_path):
    from dist_train.commands.soup import soup

    proc = run_cli("predict.py", ["--checkpoint", str(folds), "--output", str(tmp_path / "cv.csv"), "data.num_workers=0",
                                  "inference.probabilities=true"], processes=2)
    assert f"thresholds: tuned on the out-of-fold predictions of {folds.resolve()}" in proc.stdout
    assert "averaging 2 checkpoints" in proc.stdout
    thresholds = json.loads((folds / "thresholds.json").read_text())["thresholds"]
    for row in read_rows(tmp_path / "cv.csv"):
        assert set(row["labels"].split()) == {str(c) for c, t in enumerate(thresholds) if float(row[f"prob_{c}"]) >= t}

    soup(folds, tmp_path / "soup", ["data.num_workers=0"], log=lambda m: None)
    proc = run_cli("predict.py", ["--checkpoint", str(tmp_path / "soup"), "--output", str(tmp_path / "soup.csv"),
                                  "data.num_workers=0"])
    assert f"thresholds: tuned on the out-of-fold predictions of {folds.resolve()}" in proc.stdout


def test_a_study_searches_on_the_out_of_fold_map(tiles, tmp_path):
    space = {"hpo.trials": 2, "hpo.space.optim.lr": "{type: float, low: 1e-3, high: 1e-2, log: true}",
             "hpo.objective": "val_map_macro", "cv.folds": 2, "data.val": "null", "train.epochs": 1}
    run_cli("train.py", overrides(tiles, tmp_path, **space))
    study = json.loads((tmp_path / "hpo_summary.json").read_text())
    best = study["best"]
    summary = json.loads((tmp_path / best["dir"] / "cv_summary.json").read_text())
    assert best["value"] == pytest.approx(summary["oof"]["val_map_macro"])
    assert (tmp_path / best["dir"] / "thresholds.json").is_file()


def test_accumulation_trains_as_one_big_batch(tiles, tmp_path):
    exact = {"model.name": "mlp", "model.width": 16, "optim.name": "sgd", "optim.lr": 0.05, "train.epochs": 1,
             "data.train_augment": "[]"}
    run_cli("train.py", overrides(tiles, tmp_path / "big", **exact, **{"data.batch_size": 16}))
    run_cli("train.py", overrides(tiles, tmp_path / "accum", **exact, **{"data.batch_size": 8, "train.grad_accum_steps": 2}))
    big, accum = (read_weights(tmp_path / d / "checkpoints" / "last" / "model.safetensors") for d in ("big", "accum"))
    assert max((big[k] - accum[k]).abs().max().item() for k in big) < 2e-6


def test_a_student_distils_from_a_sigmoid_teacher_and_pseudo_labels_join_when_every_class_is_confident(tiles, holdout, tmp_path):
    proc = run_cli("train.py", overrides(tiles, tmp_path / "student", **{"distill.teacher": holdout, "train.epochs": 1,
                                                                        "model.name": "mlp"}))
    assert "distill: the teacher's outputs on the 210 rows" in proc.stdout
    info = json.loads((tmp_path / "student" / "run_info.json").read_text())
    assert info["distill"]["outputs"] == "cached" and np.isfinite(info["best"]["value"])

    predictions = tmp_path / "test.csv"
    run_cli("predict.py", ["--checkpoint", str(holdout), "--output", str(predictions), "data.num_workers=0",
                           "inference.probabilities=true"])
    probabilities = np.array([[float(r[f"prob_{c}"]) for c in range(10)] for r in read_rows(predictions)])
    confident = int((np.maximum(probabilities, 1 - probabilities).min(1) >= 0.8).sum())
    run_cli("train.py", overrides(tiles, tmp_path / "pseudo", **{"data.pseudo_labels": predictions, "data.pseudo_threshold": 0.8,
                                                                "train.epochs": 1, "model.name": "mlp"}))
    pseudo = json.loads((tmp_path / "pseudo" / "run_info.json").read_text())["pseudo_labels"]
    assert pseudo["added"] == confident and pseudo["predicted_rows"] == 45
    assert read_jsonl(tmp_path / "pseudo" / "metrics.jsonl")[-1]["rank_samples"] == [210 + confident]


def test_debug_and_the_trainer_api_with_a_users_multi_label_dataset(tiles, tmp_path):
    proc = run_cli("train.py", overrides(tiles, tmp_path / "debug", **{"train.epochs": 1}) + ["--debug"])
    assert "task multilabel, 10 outputs" in proc.stdout

    from dist_train import Trainer

    class Tiles(torch.utils.data.Dataset):
        """Your own dataset: (image tensor, multi-hot float target), with its classes."""

        classes = [str(d) for d in range(10)]

        def __init__(self, table):
            from PIL import Image

            self.rows = read_rows(tiles / table)
            self.images = [torch.from_numpy(np.asarray(Image.open(tiles / r["image"]), dtype=np.float32)).permute(2, 0, 1) / 255
                           for r in self.rows]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            target = torch.zeros(10)
            target[[int(c) for c in self.rows[i]["labels"].split()]] = 1.0
            return self.images[i], target

    trainer = Trainer({"task": {"kind": "multilabel", "threshold": "tune"}, "model": {"name": "mlp", "width": 16},
                       "data": {"source": "csv", "image_size": 16, "num_workers": 0, "batch_size": 16}, "train": {"epochs": 1},
                       "output_dir": str(tmp_path / "api")}, train_dataset=Tiles("train.csv"), val_dataset=Tiles("val.csv"))
    summary = trainer.fit()
    assert summary["best"]["metric"] == "val_map_macro" and summary["classes"] == {"multilabel": Tiles.classes}
    metrics = json.loads(trainer.predict(split="val", output=tmp_path / "val.csv").with_suffix(".metrics.json").read_text())
    assert metrics["val_samples"] == 45 and len(metrics["thresholds"]) == 10
