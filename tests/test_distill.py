"""From five models to one (issue 23): knowledge distillation from a run, a checkpoint or a fold ensemble (the loss
against a hand computation, alpha=1 bitwise a run without a teacher, the teacher's outputs computed once and read every
epoch, 1 and 2 processes alike, stale caches and fold leakage refused), pseudo-labelled test rows (never validated on,
counted), and fold weight soups (identical folds average to themselves, other architectures are refused).

Tiny runs on the digits (8x8, an MLP, one or two epochs); one trained teacher and one cross-validated teacher are shared
by the module."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from conftest import config_path, run_cli, tiny_overrides
from safetensors.torch import load_file

from dist_train.job.distributed import forget_process_group
from dist_train.commands.cli import train_main
from dist_train.commands.distill import prepare_teacher
from dist_train.commands.soup import soup
from dist_train.config import load_config
from dist_train.errors import ConfigError, DataError
from dist_train.models import distill as distill_module
from dist_train.models.distill import TEACHER_CACHE, Distillation, kl_to_teacher
from dist_train.models.networks import read_weights

WEIGHT_TOL = 2e-6  # as tests/test_equivalence.py: float32 sums reduced in another order on 2 ranks
STUDENT = {"model.name": "mlp", "model.width": 8, "optim.name": "sgd", "optim.lr": 0.05, "tracking.images": "false",
           "data.batch_size": 32}
TEACHER = {"model.name": "mlp", "model.width": 16, "tracking.images": "false", "train.epochs": 2}


def args(digits_root, out, **extra) -> list[str]:
    return ["--config", config_path("digits.yaml"), *tiny_overrides(digits_root, out, **extra)]


def info(run) -> dict:
    return json.loads((run / "run_info.json").read_text())


@pytest.fixture(scope="module")
def teacher(digits_root, tmp_path_factory):
    """A run trained on the digits' train.csv at 10x10 (the students see 8x8: the teacher keeps its own size)."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    run_cli("train.py", args(digits_root, out, **{**TEACHER, "data.image_size": 10}))
    return out


@pytest.fixture(scope="module")
def cv_teacher(digits_root, tmp_path_factory):
    """A 2-fold cross-validation of train.csv (oof.csv, each fold's best and held-out predictions)."""
    out = tmp_path_factory.mktemp("cv_teacher") / "run"
    run_cli("train.py", args(digits_root, out, **{**TEACHER, "train.epochs": 1, "model.width": 8, "cv.folds": 2,
                                                  "data.val": "null"}))
    return out


@pytest.fixture(scope="module")
def distilled(digits_root, teacher, tmp_path_factory):
    """1 process, alpha 0.5, T 3 from `teacher`, 2 epochs: the teacher's network calls and the cache's reads counted."""
    out = tmp_path_factory.mktemp("distilled") / "run"
    monkey = pytest.MonkeyPatch()
    calls = {"teacher": 0, "teacher_in_fit": 0, "reads": 0, "fit": 0}
    from dist_train.commands import inference
    from dist_train.loop import trainer

    built, fit, targets = inference.trained_network, trainer.fit, Distillation.targets

    def counted_model(*a, **k):  # every network predict_split builds: here only the teacher's
        network = built(*a, **k)
        network.register_forward_hook(lambda *_: calls.__setitem__("teacher", calls["teacher"] + 1))
        return network

    def counted_fit(*a, **k):
        before = calls["teacher"]
        calls["fit"] += 1
        try:
            return fit(*a, **k)
        finally:
            calls["teacher_in_fit"] += calls["teacher"] - before

    def counted_targets(self, *a):
        calls["reads"] += 1
        return targets(self, *a)

    def counted_live(self, images):  # a teacher run in the loop counts as a teacher call too
        calls["teacher"] += 1
        return live(self, images)

    live = distill_module.LiveTeacher.forward
    monkey.setattr(distill_module.LiveTeacher, "forward", counted_live)
    monkey.setattr(inference, "trained_network", counted_model)
    monkey.setattr(trainer, "fit", counted_fit)
    monkey.setattr(Distillation, "targets", counted_targets)
    try:
        assert train_main(args(digits_root, out, **{**STUDENT, "distill.teacher": teacher, "distill.alpha": 0.5,
                                                    "distill.temperature": 3.0})) == 0
    finally:
        monkey.undo()
        forget_process_group()
    return out, calls


def test_the_distillation_loss_is_the_hand_computation():
    student, teacher = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]), torch.tensor([[2.0, 0.0, -1.0], [1.0, 1.0, 1.0]])
    T = 2.0

    def softmax(row):
        e = [pow(2.718281828459045, v / T) for v in row]
        return [x / sum(e) for x in e]

    def kl(t, s):
        p, q = softmax(t), softmax(s)
        return sum(pi * (torch.log(torch.tensor(pi)) - torch.log(torch.tensor(qi))).item() for pi, qi in zip(p, q))

    expected = [T * T * kl(t, s) for t, s in zip(teacher.tolist(), student.tolist())]
    assert kl_to_teacher(student, teacher, T, [3], [1.0]).tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[0] > 0 and kl_to_teacher(teacher, teacher, T, [3], [1.0]).abs().max() < 1e-6
    # multihead: each head's softmax over its own outputs, weighted like its task loss
    heads = kl_to_teacher(student, teacher, T, [2, 1], [0.5, 3.0])
    two = kl_to_teacher(student[:, :2], teacher[:, :2], T, [2], [1.0])
    assert heads.tolist() == pytest.approx((0.5 * two).tolist(), rel=1e-6)  # a 1-class head has nothing to learn
    cfg = load_config(None, ["distill.alpha=0.25", "distill.temperature=2"]).distill
    task_losses = torch.tensor([0.7, 1.3])
    mixed = Distillation(cfg, [3], [1.0]).loss(task_losses, student, teacher)
    assert mixed.tolist() == pytest.approx([0.25 * a + 0.75 * b for a, b in zip(task_losses.tolist(), expected)], rel=1e-6)


def test_the_cache_is_keyed_by_row_id(tmp_path):
    path = tmp_path / TEACHER_CACHE
    distill_module.write_cache(path, torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]), ["a", "b", "c"], "f", {})
    assert distill_module.read_cache(path, ["c", "a"], torch.device("cpu")).tolist() == [[3.0, 0.0], [1.0, 0.0]]
    with pytest.raises(DataError, match="another training table: 1 training rows are not in it \\(e.g. 'd'\\)"):
        distill_module.read_cache(path, ["a", "d"], torch.device("cpu"))


def test_out_of_fold_targets_of_a_multihead_teacher_are_each_heads_marginals(tmp_path):
    from dist_train.commands.distill import _oof_outputs
    from dist_train.models.tasks import build_task

    config = load_config(None, ["task.kind=multihead", "data.source=csv", "task.heads=[{name: a, column: a}, {name: b, column: b}]"])
    task = build_task(config, {"heads": {"a": ["x", "y"], "b": ["p", "q", "r"]}})  # combined: x/p x/q x/r y/p y/q y/r
    combined = [[0.1, 0.2, 0.3, 0.05, 0.15, 0.2], [0.0, 0.0, 0.5, 0.5, 0.0, 0.0]]
    with open(tmp_path / "oof.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "fold", "target", "prediction", *[f"prob_{c}" for c in task.class_names]])
        writer.writerows([["r1", 0, 0, 0, *combined[0]], ["r0", 1, 0, 0, *combined[1]]])
    outputs = _oof_outputs(tmp_path / "oof.csv", ["r0", "r1"], task).exp()
    expected = [[0.5, 0.5, 0.5, 0.0, 0.5], [0.6, 0.4, 0.15, 0.35, 0.5]]  # a: x, y; b: p, q, r
    torch.testing.assert_close(outputs, torch.tensor(expected), atol=1e-6, rtol=0)


def test_the_teacher_runs_once_before_training_and_its_cache_is_read_every_epoch(distilled, digits_root, teacher):
    out, calls = distilled
    summary = info(out)
    batches = summary["batches_per_epoch_per_process"]
    assert calls["fit"] == 1 and calls["teacher"] > 0 and calls["teacher_in_fit"] == 0
    assert calls["reads"] == 2 * batches == 2 * 40
    cache = load_file(str(out / TEACHER_CACHE))
    ids = bytes(cache["ids"].numpy()).decode().split("\n")
    table = list(csv.DictReader(open(digits_root / "train.csv", newline="")))
    assert ids == [r["id"] for r in table] and cache["outputs"].shape == (len(table), 10)
    assert summary["distill"]["outputs"] == "cached" and summary["distill"]["rows"] == summary["train_samples"]
    # the cached rows are the teacher's own prediction of each image at its own 10x10 (the student sees 8x8)
    from dist_train.data.datasets import build_dataset
    from dist_train.data.tables import Records
    from dist_train.models.networks import build_model

    config = load_config(teacher / "config.yaml")
    network = build_model(config.model, 10, config.data.channels, config.data.image_size)
    network.load_state_dict(read_weights(teacher / "checkpoints" / "best" / "model.safetensors"))
    rows = [0, 5, len(table) - 1]
    records = Records([digits_root / table[i]["image"] for i in rows], [0] * 3, [table[i]["id"] for i in rows])
    images = torch.stack([build_dataset(records, config.data, "val", 0)[i][0] for i in range(3)])
    assert images.shape[-1] == 10
    with torch.no_grad():
        torch.testing.assert_close(network.eval()(images), cache["outputs"][rows], atol=1e-5, rtol=0)


def test_alpha_1_trains_bit_for_bit_as_without_a_teacher(digits_root, teacher, distilled, tmp_path):
    plain, alpha1 = tmp_path / "plain", tmp_path / "alpha1"
    run_cli("train.py", args(digits_root, plain, **STUDENT))
    run_cli("train.py", args(digits_root, alpha1, **{**STUDENT, "distill.teacher": teacher, "distill.alpha": 1.0}))
    digest = info(plain)["final_weights_sha256_per_rank"]
    assert info(alpha1)["final_weights_sha256_per_rank"] == digest
    assert info(distilled[0])["final_weights_sha256_per_rank"] != digest  # alpha 0.5: the teacher does change it


def test_trainer_fit_distils_as_train_py_does(digits_root, teacher, distilled, tmp_path):
    from dist_train import Trainer

    values = {**STUDENT, "distill.teacher": str(teacher), "distill.alpha": 0.5, "distill.temperature": 3.0}
    config = load_config(config_path("digits.yaml"), tiny_overrides(digits_root, tmp_path / "api", **values))
    Trainer(config).fit()  # the teacher's outputs computed by fit, as by train.py: the same student, bit for bit
    assert info(tmp_path / "api")["final_weights_sha256_per_rank"] == info(distilled[0])["final_weights_sha256_per_rank"]
    ours, theirs = load_file(str(tmp_path / "api" / TEACHER_CACHE)), load_file(str(distilled[0] / TEACHER_CACHE))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    from dist_train.data.datasets import build_dataset
    from dist_train.data.tables import Records

    own = build_dataset(Records([digits_root / "img.png"], [0], ["x"]), config.data, "train", 0)
    with pytest.raises(ConfigError, match="datasets of your own have none"):
        Trainer(config, output_dir=str(tmp_path / "own"), train_dataset=own, val_dataset=own, **{"model.num_classes": 10}).fit()


def test_one_and_two_processes_distil_the_same_student(digits_root, teacher, distilled, tmp_path):
    two = tmp_path / "two"
    run_cli("train.py", args(digits_root, two, **{**STUDENT, "data.batch_size": 16, "distill.teacher": teacher,
                                                  "distill.alpha": 0.5, "distill.temperature": 3.0}), processes=2)
    assert info(two)["global_batch"] == info(distilled[0])["global_batch"] == 32
    a = read_weights(distilled[0] / "checkpoints" / "last" / "model.safetensors")
    b = read_weights(two / "checkpoints" / "last" / "model.safetensors")
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= WEIGHT_TOL
    assert len(set(info(two)["final_weights_sha256_per_rank"])) == 1


def test_a_stale_cache_is_refused_naming_the_teacher_or_the_table(digits_root, teacher, distilled, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(distilled[0] / TEACHER_CACHE, out / TEACHER_CACHE)
    same = {**STUDENT, "distill.teacher": teacher}
    assert prepare_teacher(load_config(config_path("digits.yaml"), tiny_overrides(digits_root, out, **same))) == out / TEACHER_CACHE
    with pytest.raises(DataError, match="holds the outputs of another teacher .* other weights, preprocessing, TTA"):
        prepare_teacher(load_config(config_path("digits.yaml"), tiny_overrides(digits_root, out, **same, **{"distill.tta": "hflip"})))
    fewer = tmp_path / "fewer"  # the same teacher, a training table one row shorter
    fewer.mkdir()
    for name in ("val.csv", "info.csv", ".complete"):
        shutil.copy(digits_root / name, fewer / name)
    (fewer / "images").symlink_to(digits_root / "images")
    lines = (digits_root / "train.csv").read_text().splitlines()
    (fewer / "train.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match="another training table \\(1257 rows, .*the table now has 1256 rows"):
        prepare_teacher(load_config(config_path("digits.yaml"), tiny_overrides(fewer, out, **same)))


def test_under_cross_validation_a_teacher_that_saw_the_fold_is_refused(digits_root, teacher, cv_teacher, tmp_path):
    def student(**extra):
        return load_config(config_path("digits.yaml"), tiny_overrides(
            digits_root, tmp_path / "fold-0", **{**STUDENT, "cv.folds": 2, "cv.fold": 0, "data.val": "null", **extra}))

    with pytest.raises(ConfigError, match="is not a cross-validation run: under cv.folds the teacher of fold k must not"):
        prepare_teacher(student(**{"distill.teacher": teacher}))
    with pytest.raises(ConfigError, match="its fold 0 held out other rows than this run's fold 0"):
        prepare_teacher(student(**{"distill.teacher": cv_teacher, "cv.seed": 7}))  # other folds
    assert not (tmp_path / "fold-0" / TEACHER_CACHE).exists()


def test_cross_validated_students_learn_from_the_fold_that_never_saw_theirs(digits_root, cv_teacher, tmp_path):
    out = tmp_path / "cv"
    run_cli("train.py", args(digits_root, out, **{**STUDENT, "train.epochs": 1, "cv.folds": 2, "data.val": "null",
                                                  "distill.teacher": cv_teacher}))
    for k in (0, 1):
        cache = distill_module.cache_metadata(out / f"fold-{k}" / TEACHER_CACHE)
        assert json.loads(cache["teacher"])["checkpoints"] == [str(cv_teacher / f"fold-{k}" / "checkpoints" / "best")]
        assert info(out / f"fold-{k}")["distill"]["fingerprint"] == cache["fingerprint"]
    # distill.cv_targets=oof: every row's target is the teacher's out-of-fold prediction (oof.csv), no inference
    oof_run = tmp_path / "oof" / "fold-1"
    config = load_config(config_path("digits.yaml"), tiny_overrides(digits_root, oof_run, **{
        **STUDENT, "cv.folds": 2, "cv.fold": 1, "data.val": "null", "distill.teacher": cv_teacher, "distill.cv_targets": "oof"}))
    prepare_teacher(config)
    cached = load_file(str(oof_run / TEACHER_CACHE))["outputs"]
    oof = list(csv.DictReader(open(cv_teacher / "oof.csv", newline="")))
    probabilities = torch.tensor([[float(r[f"prob_{c}"]) for c in range(10)] for r in oof])
    assert cached.exp() == pytest.approx(probabilities, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# fold soups


def fake_cv_run(source_cv, tmp_path, folds) -> str:
    """A cross-validation run's directory whose folds' best checkpoints are `folds` (checkpoint directories)."""
    cv_dir = tmp_path / "cv"
    cv_dir.mkdir()
    shutil.copy(source_cv / "config.yaml", cv_dir / "config.yaml")
    for k, best in enumerate(folds):
        target = cv_dir / f"fold-{k}" / "checkpoints" / "best"
        shutil.copytree(best, target)
    return cv_dir


def test_a_soup_of_identical_folds_is_the_fold_and_predicts_like_it(cv_teacher, digits_root, tmp_path):
    best = cv_teacher / "fold-0" / "checkpoints" / "best"
    cv_dir = fake_cv_run(cv_teacher, tmp_path, [best, best])
    report = soup(cv_dir, tmp_path / "soup", [f"data.root={digits_root}", "data.val=val.csv"], log=lambda *_: None)
    ours, theirs = read_weights(tmp_path / "soup" / "model.safetensors"), read_weights(best / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    scores = report["held_out"]["scores"]
    assert report["held_out"]["rows"] == 270 and scores["soup"] == scores["fold 0"]
    assert scores["ensemble"] == pytest.approx(scores["fold 0"], rel=1e-6)
    # the real soup of two different folds: its own weights, scored beside them
    real = soup(cv_teacher, tmp_path / "real", [f"data.root={digits_root}", "data.val=val.csv"], log=lambda *_: None)
    averaged = read_weights(tmp_path / "real" / "model.safetensors")
    folds = [read_weights(cv_teacher / f"fold-{k}" / "checkpoints" / "best" / "model.safetensors") for k in (0, 1)]
    assert all(torch.allclose(averaged[k], (folds[0][k] + folds[1][k]) / 2, atol=1e-7, rtol=0) for k in averaged)
    assert not torch.equal(folds[0]["hidden.1.weight"], folds[1]["hidden.1.weight"])
    assert set(real["held_out"]["scores"]) == {"fold 0", "fold 1", "ensemble", "soup"} and len(real["oof"]["folds"]) == 2


def test_a_soup_of_different_architectures_is_refused_naming_the_difference(cv_teacher, teacher, tmp_path):
    cv_dir = fake_cv_run(cv_teacher, tmp_path, [cv_teacher / "fold-0" / "checkpoints" / "best",
                                                teacher / "checkpoints" / "best"])
    with pytest.raises(ConfigError, match=r"was trained with data.image_size=10, .* with 8: a soup averages the weights "
                                          r"of one architecture"):
        soup(cv_dir, tmp_path / "soup", log=lambda *_: None)
    assert not (tmp_path / "soup").exists()


# ----------------------------------------------------------------------------------------------
# pseudo-labels


def test_pseudo_labelled_rows_train_in_every_fold_and_validate_in_none(digits_root, tmp_path):
    test_rows = list(csv.DictReader(open(digits_root / "info.csv", newline="")))
    predictions, confident = tmp_path / "predictions.csv", {}
    with open(predictions, "w", newline="") as f:  # as predict.py ... inference.probabilities=true writes it
        writer = csv.writer(f)
        writer.writerow(["id", "label", *[f"prob_{c}" for c in range(10)]])
        for i, row in enumerate(test_rows):
            top = (0.95, 0.9, 0.5)[i % 3]  # 0.9: exactly the threshold, which it reaches
            probabilities = [top if c == i % 10 else (1 - top) / 9 for c in range(10)]
            writer.writerow([row["id"], i % 10, *[f"{p:.6g}" for p in probabilities]])
            if top >= 0.9:
                confident[row["id"]] = probabilities
    out = tmp_path / "cv"
    proc = run_cli("train.py", args(digits_root, out, **{**STUDENT, "train.epochs": 1, "cv.folds": 2, "data.val": "null",
                                                         "data.pseudo_labels": predictions, "data.pseudo_threshold": 0.9}))
    table = [r["id"] for r in csv.DictReader(open(digits_root / "train.csv", newline=""))]
    oof = [r["id"] for r in csv.DictReader(open(out / "oof.csv", newline=""))]
    assert oof == table and not set(oof) & set(confident)  # every validation row is a labelled one, once
    assert proc.stdout.count(f"pseudo-labels: {len(confident)} of the 270 test rows of {predictions} reach "
                             f"data.pseudo_threshold=0.9 and join the") == 2 and len(confident) == 180
    from dist_train.loop.build import Given, load_data

    for k in (0, 1):
        summary = info(out / f"fold-{k}")
        assert summary["pseudo_labels"]["added"] == len(confident) == sum(summary["pseudo_labels"]["per_class"].values())
        assert summary["train_samples"] == len(table) - summary["val_samples"] + len(confident)
        config = load_config(out / f"fold-{k}" / "config.yaml")
        data = load_data(config, Given())
        assert not set(data.val.ids) & set(confident) and data.pseudo["labelled_rows"] == len(table) - len(data.val.ids)
        assert data.train.ids[-len(confident):] == list(confident)  # in the test table's order, after the labelled rows
        torch.testing.assert_close(data.train.targets[-len(confident):],
                                   torch.tensor([[p / sum(v) for p in v] for v in confident.values()]), atol=1e-6, rtol=0)
        first = data.train.targets[0]  # a labelled row: its class as a one-hot distribution
        assert first.sum() == 1.0 and first.tolist().index(1.0) == int(data.train.labels["label"][0])


def test_a_live_teacher_teaches_as_its_cached_outputs_do_and_runs_under_mixup(digits_root, cv_teacher, tmp_path):
    teacher = cv_teacher / "fold-0"  # 8x8, as the students: the live teacher's input is the student's, unchanged
    runs = {}
    for how in ("false", "true"):
        runs[how] = tmp_path / f"live-{how}"
        run_cli("train.py", args(digits_root, runs[how], **{**STUDENT, "train.epochs": 1, "distill.teacher": teacher,
                                                            "distill.live": how}))
    assert info(runs["true"])["distill"]["outputs"] == "live" and not (runs["true"] / TEACHER_CACHE).exists()
    a, b = (read_weights(runs[how] / "checkpoints" / "last" / "model.safetensors") for how in ("false", "true"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5  # the same targets, but for float rounding
    plain = tmp_path / "plain"
    run_cli("train.py", args(digits_root, plain, **{**STUDENT, "train.epochs": 1}))
    assert max((a[k] - read_weights(plain / "checkpoints" / "last" / "model.safetensors")[k]).abs().max().item() for k in a) > 1e-3
    with pytest.raises(ConfigError, match="cached teacher outputs are of the unmixed images; set distill.live=true"):
        load_config(config_path("digits.yaml"), tiny_overrides(digits_root, tmp_path, **{"distill.teacher": teacher,
                                                                                          "data.mixup_alpha": 0.4}))
    mixed = tmp_path / "mixed"
    run_cli("train.py", args(digits_root, mixed, **{**STUDENT, "train.epochs": 1, "distill.teacher": teacher,
                                                    "distill.live": "true", "data.mixup_alpha": 0.4}))
    assert info(mixed)["distill"]["outputs"] == "live"


def test_a_soup_recomputes_batchnorm_statistics_on_the_training_table(digits_root, tmp_path):
    import yaml

    run = tmp_path / "cnn"
    run_cli("train.py", args(digits_root, run, **{"model.name": "small_cnn", "model.width": 4, "train.epochs": 1,
                                                  "tracking.images": "false"}))
    best = run / "checkpoints" / "best"
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["cv"], config["data"]["val"] = {"folds": 2, "fold": None, "seed": None}, None
    cv_dir = tmp_path / "cv"
    for k in (0, 1):
        shutil.copytree(best, cv_dir / f"fold-{k}" / "checkpoints" / "best")
    (cv_dir / "config.yaml").write_text(yaml.safe_dump(config))
    report = soup(cv_dir, tmp_path / "soup", ["data.eval_batch_size=2000"], log=lambda *_: None)  # one batch: exact
    ours, theirs = read_weights(tmp_path / "soup" / "model.safetensors"), read_weights(best / "model.safetensors")
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.endswith(stats)) and report["batchnorm_rows"] == 1257
    from dist_train.data.datasets import build_dataset
    from dist_train.models.tasks import load_table

    loaded = load_config(cv_dir / "config.yaml", ["cv.folds=0"])
    dataset = build_dataset(load_table(loaded)[0], loaded.data, "val", 0)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():  # the first BatchNorm's input: the first convolution of every training image
        activations = torch.nn.functional.conv2d(images, ours["features.0.0.weight"], padding=1)
    mean, var = activations.mean((0, 2, 3)), activations.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(ours["features.0.1.running_mean"], mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours["features.0.1.running_var"], var, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(theirs["features.0.1.running_mean"], mean, atol=1e-3)  # the fold's own were not these
