"""Competition data through the config: per-split tables, ids only where they matter, the grouped (and stratified)
hold-out and cv folds, and the keys a prediction may not change. Real tables and images (the masks layout), no runs."""
import csv
import warnings
from collections import Counter

import numpy as np
import pytest
from conftest import config_path
from sklearn.model_selection import StratifiedGroupKFold

from dist_train.config import load_config, model_shaping_differences, to_dict
from dist_train.data import synthetic
from dist_train.data.splits import load_test_records
from dist_train.errors import ConfigError, DataError
from dist_train.models.tasks import load_folds, load_task


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    return synthetic.write_masks(tmp_path_factory.mktemp("data") / "masks", people=40, eval_people=3, size=8)


def config(root, *overrides):
    return load_config(config_path("masks.yaml"), [f"data.root={root}", *overrides])


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def person(record_id):
    return record_id.split("/")[1]


def test_the_layout_reads_through_the_config_alone(masks):
    table = rows(masks / "train" / "labels.csv")
    assert len(table) == 280 and Counter(r["path"].rsplit("/", 1)[1] for r in table)["mask1.jpg"] == 40  # stems repeat
    train, val, classes, task = load_task(config(masks, "cv.fold=0"))
    # rows are named by their path relative to the image root, never by the stem alone
    assert sorted([*train.ids, *val.ids]) == sorted(r["path"] for r in table)
    assert all(p == masks / "train" / i for p, i in zip([*train.paths, *val.paths], [*train.ids, *val.ids]))
    assert classes == [str(c) for c in range(18)] and task.num_outputs == 18
    # the test split: its own table, image root, image and id columns, in the table's order
    test = load_test_records(config(masks).data)
    info = rows(masks / "eval" / "info.csv")
    assert test.ids == [r["ImageID"] for r in info] and test.paths == [masks / "eval" / "images" / r["ImageID"] for r in info]


def test_test_ids_must_be_unique_and_the_error_names_the_column_used(masks, tmp_path):
    info = rows(masks / "eval" / "info.csv")
    with open(tmp_path / "info.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageID", "ans"])
        writer.writerows([[r["ImageID"], 0] for r in info] + [[info[1]["ImageID"], 0]])
    cfg = config(masks, f"data.test.table={tmp_path / 'info.csv'}").data
    with pytest.raises(DataError, match=rf"info.csv: column 'ImageID' has duplicate ids: '{info[1]['ImageID']}' on rows 2 "
                                        rf"and {len(info) + 1}; the submission needs one row per id"):
        load_test_records(cfg)


def test_a_labelled_table_with_an_id_column_keeps_its_ids(masks, tmp_path):
    table = rows(masks / "train" / "labels.csv")
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", *table[0]])
        writer.writeheader()
        writer.writerows({"id": f"row{i}", **r} for i, r in enumerate(table))
    train, val, _, _ = load_task(config(masks, f"data.train.table={tmp_path / 'labels.csv'}", "cv.fold=1"))
    assert sorted([*train.ids, *val.ids], key=lambda i: int(i[3:])) == [f"row{i}" for i in range(len(table))]


def assert_grouped(train, val):
    assert {person(i) for i in train.ids}.isdisjoint({person(i) for i in val.ids})


def test_the_grouped_holdout_keeps_each_person_on_one_side_and_the_label_mix(masks):
    cfg = config(masks, "cv.folds=0", "data.val_fraction=0.25")
    train, val, _, _ = load_task(cfg)
    assert_grouped(train, val)
    table = rows(masks / "train" / "labels.csv")
    assert len(train.ids) + len(val.ids) == len(table) and len(val.ids) % 7 == 0  # whole people
    # the first of round(1 / val_fraction) = 4 folds of scikit-learn's StratifiedGroupKFold, seeded by the run's seed
    y, groups = [r["label"] for r in table], [r["path"].split("/")[1] for r in table]
    with warnings.catch_warnings():  # classes rarer than 4 people: stratified as far as they go
        warnings.simplefilter("ignore", UserWarning)
        _, held = next(StratifiedGroupKFold(4, shuffle=True, random_state=cfg.seed).split(np.zeros(len(y)), y, groups))
    assert sorted(val.ids) == sorted(table[i]["path"] for i in held)
    # without data.group_column the hold-out puts one person's photos on both sides: what the issue measured
    free_train, free_val, _, _ = load_task(config(masks, "cv.folds=0", "data.val_fraction=0.25", "data.group_column=null"))
    assert {person(i) for i in free_train.ids} & {person(i) for i in free_val.ids}


def test_every_fold_holds_out_whole_groups_each_row_once_stratified_where_possible(masks):
    cfg = config(masks, "cv.folds=4")
    records, _, _, folds = load_folds(cfg)
    held = []
    for k in range(4):
        train, val, _, _ = load_task(config(masks, "cv.folds=4", f"cv.fold={k}"))
        assert_grouped(train, val)
        assert sorted(val.ids) == sorted(records.ids[i] for i in np.flatnonzero(folds == k))
        assert len(train.ids) + len(val.ids) == len(records.ids)
        held += val.ids
    assert sorted(held) == sorted(records.ids)  # every row held out exactly once
    # the mask mix (5:1:1 within every person) is exact in every fold; gender stays near the table's share
    overall = Counter(records.labels["label"])
    for k in range(4):
        fold = [records.labels["label"][i] for i in np.flatnonzero(folds == k)]
        masks_in_fold = Counter(int(label) // 6 for label in fold)
        assert masks_in_fold[0] == 5 * masks_in_fold[1] == 5 * masks_in_fold[2]
        female = sum(int(label) // 3 % 2 for label in fold) / len(fold)
        assert female == pytest.approx(sum(int(k) // 3 % 2 * n for k, n in overall.items()) / len(records.ids), abs=0.2)
    # seeded: cv.seed moves the folds, the run's seed does not when cv.seed is set
    assert (load_folds(config(masks, "cv.folds=4", "cv.seed=1"))[3] == load_folds(config(masks, "cv.folds=4", "cv.seed=1", "seed=5"))[3]).all()
    assert (load_folds(config(masks, "cv.folds=4", "cv.seed=1"))[3] != folds).any()


def test_group_column_names_a_column_or_parent_dir(masks, tmp_path):
    table = rows(masks / "train" / "labels.csv")
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*table[0], "person"])
        writer.writeheader()
        writer.writerows({**r, "person": r["path"].split("/")[1]} for r in table)
    by_column = load_folds(config(masks, f"data.train.table={tmp_path / 'labels.csv'}", "data.group_column=person", "cv.folds=3"))
    by_folder = load_folds(config(masks, "cv.folds=3"))
    assert (by_column[3] == by_folder[3]).all()
    with pytest.raises(DataError, match=r"data.group_column 'persn' is not a column \(did you mean 'person'\?\).*parent_dir"):
        load_folds(config(masks, f"data.train.table={tmp_path / 'labels.csv'}", "data.group_column=persn", "cv.folds=3"))
    with pytest.raises(DataError, match=r"40 groups \(data.group_column\) for 50 folds"):
        load_folds(config(masks, "cv.folds=50"))


def test_split_mappings_and_cv_keys_are_checked_like_every_key(masks):
    with pytest.raises(ConfigError, match=r"unknown config key data.test.image_colum; did you mean data.test.image_column\?"):
        config(masks, "data.test={table: eval/info.csv, image_colum: ImageID}")
    with pytest.raises(ConfigError, match=r"data.val: a mapping needs `table`"):
        config(masks, "cv.folds=0", "data.val={image_root: x}")
    with pytest.raises(ConfigError, match=r"cv.folds=5 validates each fold on the training rows it holds out: set data.val: "
                                          r"null \(it is 'val.csv'\)"):
        config(masks, "data.val=val.csv")
    with pytest.raises(ConfigError, match=r"cv.fold must be in 0 .. 4 \(cv.folds=5\), not 5"):
        config(masks, "cv.fold=5")
    with pytest.raises(ConfigError, match=r"cv.folds=5: train.py trains every fold in turn"):
        load_task(config(masks))
    # the table form of the key still works as it did, and the mapping round-trips through the run's config.yaml
    plain = config(masks, "data.train=train/labels.csv", "data.image_root=train", "data.image_column=path", "cv.fold=0")
    assert load_task(plain)[0].ids == load_task(config(masks, "cv.fold=0"))[0].ids
    assert to_dict(config(masks))["data"]["test"] == {"table": "eval/info.csv", "image_root": "eval/images",
                                                      "image_column": "ImageID", "id_column": "ImageID"}


def test_keys_that_shape_the_model_are_compared_with_the_checkpoints(masks):
    saved = to_dict(config(masks, "model.width=64"))
    assert model_shaping_differences(saved, config(masks, "model.width=64", "data.batch_size=7", "model.freeze=[features]",
                                                   "inference.tta=hflip", "data.root=elsewhere")) == []
    assert model_shaping_differences(saved, config(masks, "model.width=16", "data.image_size=24")) == [
        ("data.image_size", 32, 24), ("model.width", 64, 16)]
    assert model_shaping_differences(saved, config(masks, "model.width=64", "task.kind=regression", "checkpoint.monitor=val_rmse"))[0] == \
        ("task.kind", "classification", "regression")
    del saved["model"]["width"]  # a checkpoint of an older version, without the key: not compared
    assert model_shaping_differences(saved, config(masks, "model.width=16")) == []


def test_a_validation_table_of_its_own_may_not_share_a_group_with_training(masks, tmp_path):
    """data.val given with data.group_column: a person in both tables is refused, named; apart, it loads as given."""
    table = rows(masks / "train" / "labels.csv")
    people = sorted({person(r["path"]) for r in table})
    for name, keep in (("train", people[:30]), ("val", people[28:])):  # people 28 and 29 on both sides
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(r for r in table if person(r["path"]) in keep)
    split = lambda name: f"{{table: {tmp_path / name}.csv, image_root: train, image_column: path}}"  # noqa: E731
    overlapping = config(masks, "cv.folds=0", f"data.train={split('train')}", f"data.val={split('val')}")
    with pytest.raises(DataError, match=rf"data.group_column 'parent_dir': 2 of the 12 groups of {tmp_path / 'val.csv'} are "
                                        rf"in {tmp_path / 'train.csv'} too \('images/{people[28]}', 'images/{people[29]}'\)"):
        load_task(overlapping)
    with open(tmp_path / "val.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(r for r in table if person(r["path"]) in people[30:])
    train, val, _, _ = load_task(config(masks, "cv.folds=0", f"data.train={split('train')}", f"data.val={split('val')}"))
    assert_grouped(train, val)
    assert len(train.ids) == 30 * 7 and len(val.ids) == 10 * 7
