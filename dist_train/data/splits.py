"""Which rows train and which validate: per-split tables, hold-out and grouped splits, k-fold assignment, the digits."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from dist_train.config import CVConfig, DataConfig
from dist_train.data.columns import Column, sorted_rank
from dist_train.data.digits import materialize_digits
from dist_train.data.table_cache import computed_once
from dist_train.data.tables import Records, read_split, split_source
from dist_train.errors import ConfigError, DataError



def load_training(cfg: DataConfig, label, columns: list[str] | None = None, query: str | None = None):
    """The whole training table with its targets, and what its labels define (see load_splits)."""
    if cfg.source == "digits":
        materialize_digits(Path(cfg.root))
    train = read_split(cfg, "train", True, columns, query)
    train.targets, defined = label(train.labels, str(split_source(cfg, "train").table), None)
    return train, defined


def load_splits(cfg: DataConfig, seed: int, label, columns: list[str] | None = None, query: str | None = None,
                stratify: bool = True, cv: CVConfig | None = None):
    """The training and validation splits, and what their labels define (e.g. the class names).

    `label(labels, where, defined)` turns a split's raw label columns into its targets and returns
    (targets, defined); it sees the whole training table first (defined=None: it decides, e.g. the classes),
    then the validation table. `query` becomes `Records.groups`. With cv.folds: fold cv.fold of the training
    table is the validation split (assign_folds). Without data.val: a seeded hold-out of the training table,
    stratified by its first label column; with data.group_column, the first of round(1 / val_fraction) grouped
    folds (assign_folds).
    """
    train, defined = load_training(cfg, label, columns, query)
    where = str(split_source(cfg, "train").table)
    if cv is not None and cv.folds > 0:
        if cv.fold is None:
            raise ConfigError(f"cv.folds={cv.folds}: train.py trains every fold in turn (dist_train.cv); one run trains one "
                              f"fold: set cv.fold")
        folds = assign_folds(train, cv.folds, seed if cv.seed is None else cv.seed, stratify, where, cfg.cache_dir)
        return train.take(np.flatnonzero(folds != cv.fold)), train.take(np.flatnonzero(folds == cv.fold)), defined
    if cfg.val is not None:
        val = read_split(cfg, "val", True, columns, query)
        val.targets, _ = label(val.labels, str(split_source(cfg, "val").table), defined)
        check_groups_apart(train, val, cfg)
    elif train.split_groups is not None:
        folds = assign_folds(train, max(2, round(1 / cfg.val_fraction)), seed, stratify, where, cfg.cache_dir)
        train, val = train.take(np.flatnonzero(folds != 0)), train.take(np.flatnonzero(folds == 0))
    else:
        first = next(iter(train.labels.values()))
        train, val = _holdout(train, cfg.val_fraction, seed, first if stratify else None)
    return train, val, defined


def check_groups_apart(train: Records, val: Records, cfg: DataConfig) -> None:
    """A validation table of its own, with data.group_column: no group may be on both sides (the validation score
    would count, e.g., photos of people the model trained on: the 6-point optimism grouping is there to remove)."""
    if train.split_groups is None or val.split_groups is None:
        return
    val_groups = pc.unique(val.split_groups.arrow())
    shared = sorted(pc.filter(val_groups, pc.is_in(val_groups, value_set=train.split_groups.arrow())).to_pylist())
    if shared:
        examples = ", ".join(repr(g) for g in shared[:3]) + (", ..." if len(shared) > 3 else "")
        raise DataError(f"data.group_column {cfg.group_column!r}: {len(shared)} of the {len(val_groups)} groups of "
                        f"{split_source(cfg, 'val').table} are in {split_source(cfg, 'train').table} too ({examples}): the "
                        f"validation score would count rows of groups the model trained on; take them out of one table, "
                        f"or leave data.val unset for a grouped hold-out (or cv.folds)")


def load_test_records(cfg: DataConfig) -> Records:
    if cfg.test is None:
        raise ConfigError("data.test is not set: nothing to predict")
    if cfg.source == "digits":
        materialize_digits(Path(cfg.root))
    records = read_split(cfg, "test", labelled=False)
    records.targets = torch.full((len(records.paths),), -1, dtype=torch.int64)
    return records


def _holdout(records: Records, fraction: float, seed: int, stratify: Column | None) -> tuple[Records, Records]:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(records.paths))
    strata = stratify.codes()[0] if stratify is not None else None  # numbered as scikit-learn numbers the strings
    if strata is not None and np.bincount(strata).min() < 2:
        strata = None  # a class with a single row cannot be on both sides: stratified where possible means not here
    train_idx, val_idx = train_test_split(index, test_size=fraction, random_state=seed, stratify=strata)
    return records.take(np.sort(train_idx)), records.take(np.sort(val_idx))


def assign_folds(records: Records, folds: int, seed: int, stratify: bool, where: str, cache_dir: str | None = None
                 ) -> np.ndarray:
    """Each row's fold, 0 .. folds - 1, seeded: grouped by `records.split_groups` (no group in two folds) and, when
    `stratify`, stratified by the label columns together, as far as the groups allow (scikit-learn's
    StratifiedGroupKFold, GroupKFold, StratifiedKFold or KFold, shuffled). Labels and groups reach scikit-learn as
    integer codes numbered in their strings' sorted order, which is how it numbers strings itself: the same folds,
    without a Python string per row. A grouped split of a large table (StratifiedGroupKFold: 20-50 s and 2.4 GiB
    at 1.28 M rows, 1,000 classes and 100,000 groups) is computed once, by one process, and kept in the table cache
    (data.cache_dir) under a digest of everything it depends on."""
    strata = _strata(list(records.labels.values())) if stratify else None
    groups = records.split_groups.codes()[0] if records.split_groups is not None else None
    split = lambda: _split(len(records.paths), folds, seed, strata, groups, where)  # noqa: E731
    if groups is None or len(records.paths) < CACHED_SPLIT_ROWS:
        return split()
    import sklearn

    digest = hashlib.sha256(f"{folds} {seed} {stratify} {sklearn.__version__}".encode())
    for codes in (strata, groups):
        digest.update(b"-" if codes is None else codes.tobytes())
    return computed_once(cache_dir, "folds", digest.hexdigest(), split)


CACHED_SPLIT_ROWS = 100_000
"""From this many rows a grouped split is computed once and kept (assign_folds)."""


def _split(count: int, folds: int, seed: int, strata: np.ndarray | None, groups: np.ndarray | None, where: str
           ) -> np.ndarray:
    from sklearn.model_selection import (
        GroupKFold,
        KFold,
        StratifiedGroupKFold,
        StratifiedKFold,
    )

    stratify = strata is not None
    units = int(groups.max()) + 1 if groups is not None and count else count
    if units < folds:
        what = "groups (data.group_column)" if groups is not None else "rows"
        raise DataError(f"{where}: {units} {what} for {folds} folds (or a hold-out of 1/{folds}, data.val_fraction); "
                        f"every fold needs at least one")
    if groups is not None:
        splitter = (StratifiedGroupKFold if stratify else GroupKFold)(folds, shuffle=True, random_state=seed)
    else:
        splitter = (StratifiedKFold if stratify else KFold)(folds, shuffle=True, random_state=seed)
    assigned = np.full(count, -1)
    with warnings.catch_warnings():  # a class rarer than the folds: stratified as far as it goes, said in the docs
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        try:
            for fold, (_, held) in enumerate(splitter.split(np.zeros(count), strata, groups)):
                assigned[held] = fold
        except ValueError as exc:
            raise DataError(f"{where}: cannot split into {folds} folds: {exc}") from None
    return assigned


def _strata(columns: list[Column]) -> np.ndarray:
    """Each row's combination of label values, numbered in the sorted order of the values joined by "\\x1f" (how the
    strata were strings before): each column coded, the combinations that occur joined and sorted."""
    if len(columns) == 1:
        return columns[0].codes()[0]
    coded = [column.codes() for column in columns]
    combined = np.zeros(len(columns[0]), dtype=np.int64)
    for codes, values in coded:
        combined = combined * len(values) + codes
    present, inverse = np.unique(combined, return_inverse=True)
    names = []
    for key in present.tolist():
        parts = []
        for codes, values in reversed(coded):
            key, code = divmod(key, len(values))
            parts.append(values[code])
        names.append("\x1f".join(reversed(parts)))
    return sorted_rank(names)[inverse]
