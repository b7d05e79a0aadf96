"""Tasks beyond one label (multihead, regression, ranking) and the competition tricks (EMA, mixup/CutMix, TTA,
ensembles, probabilities): unit checks against hand/scikit-learn values, and real 1- and 2-process runs."""
import csv
import json

import numpy as np
import pytest
import torch
from conftest import assert_killed, config_path, read_jsonl, run_cli, tiny_overrides
from safetensors.torch import load_file
from sklearn.metrics import mean_absolute_error, mean_squared_error, ndcg_score

from dist_train.commands.inference import FlipAverage
from dist_train.config import load_config
from dist_train.data import synthetic
from dist_train.errors import ConfigError
from dist_train.models.losses import CrossEntropy, FocalLoss
from dist_train.models.metrics import classification_metrics
from dist_train.models.tasks import build_task

HEADS = ["task.kind=multihead",
         "task.heads=[{name: mask, column: mask, classes: [wear, incorrect, not_wear]}, "
         "{name: gender, column: gender, classes: [male, female]}, "
         "{name: age, column: age, classes: [young, middle, old], weight: 1.5, loss: {name: focal, focal_gamma: 2.0}}]"]


def multihead_task():
    config = load_config(None, ["data.source=csv", *HEADS])
    labels = {"heads": {"mask": ["wear", "incorrect", "not_wear"], "gender": ["male", "female"], "age": ["young", "middle", "old"]}}
    return build_task(config, labels)


def test_multihead_combined_class_is_6_mask_plus_3_gender_plus_age():
    task = multihead_task()
    assert task.num_outputs == 8 and len(task.class_names) == 18
    heads = torch.tensor([[m, g, a] for m in range(3) for g in range(2) for a in range(3)])
    assert task.combine(heads).tolist() == (6 * heads[:, 0] + 3 * heads[:, 1] + heads[:, 2]).tolist() == list(range(18))
    assert task.class_names[7] == "incorrect/male/middle" and task.class_names[17] == "not_wear/female/old"


def test_multihead_loss_metrics_and_probabilities_follow_the_heads():
    task = multihead_task()
    torch.manual_seed(0)
    outputs, targets = torch.randn(50, 8), torch.stack([torch.randint(0, n, (50,)) for n in (3, 2, 3)], 1)
    expected = (CrossEntropy()(outputs[:, :3], targets[:, 0]) + CrossEntropy()(outputs[:, 3:5], targets[:, 1])
                + 1.5 * FocalLoss(2.0)(outputs[:, 5:], targets[:, 2]))
    losses = task.loss()(outputs, targets)
    torch.testing.assert_close(losses, expected)
    metrics = task.metrics(outputs, targets, losses)
    age = classification_metrics(outputs[:, 5:], targets[:, 2], losses)
    assert metrics["val_age_accuracy"] == age["val_accuracy"] and metrics["val_age_f1_macro"] == age["val_f1_macro"]
    combined = 6 * outputs[:, :3].argmax(1) + 3 * outputs[:, 3:5].argmax(1) + outputs[:, 5:].argmax(1)
    assert metrics["val_accuracy"] == pytest.approx((combined == task.combine(targets)).double().mean().item())
    probabilities = task.probabilities(outputs)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(50))
    assert probabilities.argmax(1).tolist() == combined.tolist()
    assert task.predictions(outputs) == [str(c) for c in combined.tolist()]


def test_flip_tta_averages_the_probabilities_of_both_views():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    task = build_task(load_config(None, []), [str(i) for i in range(5)])
    images = torch.randn(6, 3, 4, 4)
    averaged = FlipAverage(model, task)(images).exp()
    expected = (model(images).softmax(1) + model(images.flip(-1)).softmax(1)) / 2
    torch.testing.assert_close(averaged, expected)


def test_task_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key task.heads\[0\].colum; did you mean task.heads\[0\].column"):
        load_config(None, ["data.source=csv", "task.kind=multihead", "task.heads=[{name: a, colum: x}, {name: b}]"])
    with pytest.raises(ConfigError, match="task.kind=multihead needs at least two task.heads"):
        load_config(None, ["data.source=csv", "task.kind=multihead", "task.heads=[{name: a}]"])
    with pytest.raises(ConfigError, match="mixing needs task.kind=classification"):
        load_config(None, ["data.source=csv", "task.kind=regression", "data.mixup_alpha=0.2"])
    with pytest.raises(ConfigError, match="unknown metric 'val_accuracy' for task.kind=regression; did you mean"):
        load_config(None, ["data.source=csv", "task.kind=regression", "checkpoint.monitor=val_accuracy"])
    regression = load_config(None, ["data.source=csv", "task.kind=regression"])
    assert (regression.checkpoint.monitor, regression.checkpoint.mode) == ("val_rmse", "min")
    ranking = load_config(None, ["data.source=csv", "task.kind=ranking", "task.ndcg_k=5"])
    assert (ranking.checkpoint.monitor, ranking.checkpoint.mode) == ("val_ndcg@5", "max")


# ----------------------------------------------------------------------------------------------
# real runs


def common(root, out, **extra):
    values = {"data.source": "csv", "data.root": str(root), "data.image_size": 16, "data.num_workers": 0,
              "data.mean": "[0.5,0.5,0.5]", "data.std": "[0.25,0.25,0.25]", "data.batch_size": 16, "model.name": "mlp",
              "model.width": 64, "train.epochs": 2, "train.log_every_n_steps": 1, "train.distributed_timeout_s": 120,
              "scheduler.name": "constant", "tracking.images": "false", "output_dir": str(out)}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def assert_each_rank(out):
    """Every rank trained on its share of each epoch (padding at most one batch) and ended with the same weights."""
    info = json.loads((out / "run_info.json").read_text())
    world, batch = info["num_processes"], info["per_process_batch"]
    digests = info["final_weights_sha256_per_rank"]
    assert len(digests) == world and len(set(digests)) == 1
    for record in read_jsonl(out / "metrics.jsonl"):
        samples = record["rank_samples"]
        assert len(samples) == world and max(samples) - min(samples) <= batch
        assert info["train_samples"] <= sum(samples) < info["train_samples"] + world * batch


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_multihead_run_is_the_same_in_1_and_2_processes_and_submits_combined_classes(tmp_path):
    root = synthetic.write_attributes(tmp_path / "attributes", count=480)
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"run{processes}"
        args = common(root, out, **{"data.batch_size": 32 // processes})
        run_cli("train.py", ["--config", config_path("attributes.yaml"), *args], processes=processes)
        runs[processes] = read_jsonl(out / "metrics.jsonl")
        assert_each_rank(out)
        run_cli("predict.py", ["--config", config_path("attributes.yaml"), *args, "inference.probabilities=true",
                               "--checkpoint", str(out / "checkpoints" / "best")], processes=processes)
    for one, two in zip(runs[1], runs[2], strict=True):
        for key in ("val_loss", "val_accuracy", "val_mask_accuracy", "val_gender_f1_macro", "val_age_accuracy", "train_loss"):
            assert one[key] == pytest.approx(two[key], rel=1e-4, abs=1e-6), key
    assert runs[2][-1]["val_accuracy"] > 0.3  # 18 classes: chance is 0.056
    first, second = rows(tmp_path / "run1" / "submission.csv"), rows(tmp_path / "run2" / "submission.csv")
    assert [r["id"] for r in first] == [r["id"] for r in rows(root / "info.csv")] == [r["id"] for r in second]
    assert [r["label"] for r in first] == [r["label"] for r in second]
    assert len(first[0]) == 2 + 18 and all(0 <= int(r["label"]) < 18 for r in first)
    for r in second:
        probabilities = [float(r[f"prob_{name}"]) for name in multihead_task().class_names]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        assert int(r["label"]) == int(np.argmax(probabilities))


def test_regression_metrics_equal_sklearn_on_the_submission_in_2_processes(tmp_path):
    root = synthetic.write_regression(tmp_path / "regression", count=300)
    out = tmp_path / "run"
    args = common(root, out, **{"task.kind": "regression", "task.targets": "[value]", "task.loss": "huber",
                                "train.epochs": 3, "optim.lr": 0.003})
    trained = run_cli("train.py", args, processes=2)
    assert "val_mae" in trained.stdout and "best val_rmse" in trained.stdout
    history = read_jsonl(out / "metrics.jsonl")
    assert_each_rank(out)
    assert history[-1]["val_rmse"] < history[0]["val_rmse"]
    run_cli("predict.py", [*args, "--checkpoint", str(out / "checkpoints" / "last"), "--split", "val",
                           "--output", str(tmp_path / "val.csv")], processes=2)
    predicted = {r["id"]: float(r["label"]) for r in rows(tmp_path / "val.csv")}
    truth = {r["id"]: float(r["value"]) for r in rows(root / "val.csv")}
    assert list(predicted) == list(truth)
    metrics = json.loads((tmp_path / "val.metrics.json").read_text())
    y, p = list(truth.values()), [predicted[k] for k in truth]
    assert metrics["val_mae"] == pytest.approx(mean_absolute_error(y, p), rel=1e-4)
    assert metrics["val_rmse"] == pytest.approx(mean_squared_error(y, p) ** 0.5, rel=1e-4)
    assert metrics["val_rmse"] == pytest.approx(history[-1]["val_rmse"], rel=1e-4)  # the run's own last evaluation


def test_ranking_metrics_per_query_survive_the_gather_in_2_processes(tmp_path):
    root = synthetic.write_ranking(tmp_path / "ranking", queries=40, per_query=6)
    out = tmp_path / "run"
    args = common(root, out, **{"task.kind": "ranking", "data.label_column": "relevance", "task.ndcg_k": 3,
                                "data.batch_size": 7})  # batches cut across queries and ranks
    run_cli("train.py", args, processes=2)
    assert_each_rank(out)
    run_cli("predict.py", [*args, "--checkpoint", str(out / "checkpoints" / "last"), "--split", "val",
                           "--output", str(tmp_path / "val.csv")], processes=2)
    scores = {r["id"]: float(r["label"]) for r in rows(tmp_path / "val.csv")}
    by_query = {}
    for r in rows(root / "val.csv"):
        by_query.setdefault(r["query"], ([], []))
        by_query[r["query"]][0].append(float(r["relevance"]))
        by_query[r["query"]][1].append(scores[r["id"]])
    expected = np.mean([ndcg_score([rel], [s], k=3) for rel, s in by_query.values()])
    metrics = json.loads((tmp_path / "val.metrics.json").read_text())
    assert metrics["val_ndcg@3"] == pytest.approx(expected, rel=1e-6)
    assert read_jsonl(out / "metrics.jsonl")[-1]["val_ndcg@3"] == pytest.approx(expected, rel=1e-6)


def test_ema_is_evaluated_checkpointed_resumed_and_predicts(digits_root, tmp_path):
    ema_run = {"train.ema_decay": 0.9, "model.name": "mlp", "checkpoint.every_n_steps": 7}
    run = tiny_overrides(digits_root, tmp_path / "ema", **ema_run)
    run_cli("train.py", run, processes=2)
    assert_each_rank(tmp_path / "ema")
    best = tmp_path / "ema" / "checkpoints" / "best"
    ema, model = load_file(str(best / "ema.safetensors")), load_file(str(best / "model.safetensors"))
    assert ema.keys() == model.keys() and any(not torch.equal(ema[k], model[k]) for k in ema)
    # validation scored the average: predicting the validation split with it gives the run's best val_accuracy
    run_cli("predict.py", [*run, "--checkpoint", str(best), "--split", "val", "--output", str(tmp_path / "v.csv")], processes=2)
    best_epoch = max(read_jsonl(tmp_path / "ema" / "metrics.jsonl"), key=lambda r: r["val_accuracy"])
    assert json.loads((tmp_path / "v.metrics.json").read_text())["val_accuracy"] == pytest.approx(best_epoch["val_accuracy"])
    run_cli("predict.py", [*run, "inference.weights=model", "--checkpoint", str(best), "--split", "val",
                           "--output", str(tmp_path / "m.csv")], processes=2)
    assert (tmp_path / "v.csv").read_text() != (tmp_path / "m.csv").read_text() or ema == model
    # killed mid-run and resumed: the same average as the uninterrupted run, to the bit
    cut = tiny_overrides(digits_root, tmp_path / "cut", **ema_run)
    killed = run_cli("train.py", cut, processes=2, check=False, env={"DIST_TRAIN_FAULT": "kill@step:10"})
    assert_killed(killed)
    run_cli("train.py", [*cut, "--resume", "auto"], processes=2)
    last = lambda d: load_file(str(d / "checkpoints" / "last" / "ema.safetensors"))  # noqa: E731
    uninterrupted, resumed = last(tmp_path / "ema"), last(tmp_path / "cut")
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_mixup_cutmix_runs_are_replayable_and_differ_from_plain_training(digits_root, tmp_path):
    mixing = {"data.mixup_alpha": 0.4, "data.cutmix_alpha": 1.0, "model.name": "mlp", "train.epochs": 1}
    digests = []
    for name, extra in [("a", mixing), ("b", mixing), ("plain", {"model.name": "mlp", "train.epochs": 1})]:
        run_cli("train.py", tiny_overrides(digits_root, tmp_path / name, **extra), processes=2)
        digests.append(json.loads((tmp_path / name / "run_info.json").read_text())["final_weights_sha256_per_rank"])
    assert digests[0] == digests[1] and len(set(digests[0])) == 1  # the same on both ranks, and run after run
    assert digests[0] != digests[2]


def test_ensemble_averages_the_probabilities_of_its_checkpoints(digits_root, tmp_path):
    run = tiny_overrides(digits_root, tmp_path / "run", **{"checkpoint.every_n_steps": 7, "checkpoint.keep_last": 5})
    run_cli("train.py", run, processes=1)
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[:2]
    probs = []
    for i, c in enumerate(checkpoints):
        run_cli("predict.py", [*run, "inference.probabilities=true", "--checkpoint", str(c), "--output", str(tmp_path / f"{i}.csv")])
        probs.append(np.array([[float(v) for k, v in r.items() if k.startswith("prob_")] for r in rows(tmp_path / f"{i}.csv")]))
    run_cli("predict.py", [*run, "inference.probabilities=true", "--checkpoint", *map(str, checkpoints),
                           "--output", str(tmp_path / "ensemble.csv")], processes=2)
    ensemble = rows(tmp_path / "ensemble.csv")
    averaged = np.array([[float(v) for k, v in r.items() if k.startswith("prob_")] for r in ensemble])
    np.testing.assert_allclose(averaged, (probs[0] + probs[1]) / 2, rtol=1e-4, atol=1e-6)
    assert [r["label"] for r in ensemble] == [str(i) for i in averaged.argmax(1)]


def test_roc_auc_and_top_k_equal_sklearn_and_are_the_same_in_1_and_2_processes(digits_root, tmp_path):
    from sklearn.metrics import roc_auc_score, top_k_accuracy_score

    extra = {"task.roc_auc": "true", "task.top_k": "[3]", "model.name": "mlp", "train.epochs": 1}
    records = {}
    for processes in (1, 2):
        out = tmp_path / f"run{processes}"
        run = tiny_overrides(digits_root, out, **{**extra, "data.batch_size": 32 // processes})
        run_cli("train.py", run, processes=processes)
        records[processes] = read_jsonl(out / "metrics.jsonl")[-1]
        assert_each_rank(out)
    run_cli("predict.py", [*run, "inference.probabilities=true", "--checkpoint", str(out / "checkpoints" / "last"),
                           "--split", "val", "--output", str(tmp_path / "val2.csv")], processes=2)
    for key in ("val_roc_auc", "val_top3_accuracy", "val_accuracy"):
        assert records[1][key] == pytest.approx(records[2][key], rel=1e-5), key
    predicted = rows(tmp_path / "val2.csv")
    truth = {r["id"]: int(r["label"]) for r in rows(digits_root / "val.csv")}
    y = [truth[r["id"]] for r in predicted]
    p = np.array([[float(r[f"prob_{c}"]) for c in range(10)] for r in predicted])
    metrics = json.loads((tmp_path / "val2.metrics.json").read_text())
    assert metrics["val_roc_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"), rel=1e-4)
    assert metrics["val_top3_accuracy"] == pytest.approx(top_k_accuracy_score(y, p, k=3, labels=range(10)), rel=1e-6)
    assert metrics["val_roc_auc"] == pytest.approx(records[2]["val_roc_auc"], rel=1e-5)


def test_targets_of_every_task_collate_for_both_decode_paths():
    from torch.utils.data import default_collate

    from dist_train.data.datasets import as_target
    from dist_train.data.decode import collate_encoded

    sample = {"data": torch.zeros(3, dtype=torch.uint8), "box": (0.0, 0.0, 1.0, 1.0), "flip": False, "path": "x.jpg"}
    for value, shape, dtype in [(3, (2,), torch.long), ((1, 0, 2), (2, 3), torch.long), ((0.5, 2.0), (2, 2), torch.float32),
                                (1.5, (2,), torch.float32)]:
        _, targets, _ = collate_encoded([(sample, as_target(value), 0), (sample, as_target(value), 1)])
        assert targets.shape == shape and targets.dtype == dtype
        assert torch.equal(default_collate([as_target(value)] * 2), targets)
