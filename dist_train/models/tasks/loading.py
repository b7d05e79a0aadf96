"""From a config to a task and its targets: which columns hold labels, what the training labels define (classes.json),
the splits or folds with their targets, and the task built for them."""
from __future__ import annotations

import numpy as np

from dist_train.config import Config, DataConfig
from dist_train.custom import class_names
from dist_train.data.splits import assign_folds, load_splits, load_training
from dist_train.data.tables import Records, sorted_labels, split_source
from dist_train.errors import ConfigError, DataError
from dist_train.models.tasks.base import Task
from dist_train.models.tasks.classification import Classification
from dist_train.models.tasks.multihead import MultiHead
from dist_train.models.tasks.multilabel import MultiLabel, multilabel_classes
from dist_train.models.tasks.ranking import Ranking
from dist_train.models.tasks.regression import Regression


def label_columns(config: Config) -> list[str]:
    """The CSV columns holding a labelled row's target(s)."""
    task = config.task
    if task.kind == "multihead":
        return [head.column for head in task.heads]
    if task.kind in ("regression", "multilabel"):
        return list(task.targets) or [config.data.label_column]
    return [config.data.label_column]


def fit_labels(config: Config, columns: dict[str, list[str]]) -> list[str] | dict:
    """What the training labels define, saved with every checkpoint (classes.json) so that inference
    rebuilds the same task: the class names (classification), each head's class names (multihead), the
    target columns (regression) or the relevance column (ranking); multilabel: the class names (and, added once the
    table is encoded, each class's positive rows and the number of rows: loss.pos_weight=balanced)."""
    task = config.task
    if task.kind == "classification":
        labels = columns[config.data.label_column]
        return list(config.data.classes) if config.data.classes is not None else sorted_labels(labels)
    if task.kind == "multihead":
        return {"heads": {head.name: list(head.classes) if head.classes is not None else sorted_labels(columns[head.column])
                          for head in task.heads}}
    if task.kind == "multilabel":
        return {"multilabel": multilabel_classes(config, columns)}
    if task.kind == "regression":
        return {"targets": label_columns(config)}
    return {"relevance": config.data.label_column, "query": task.query_column}


def label_names(labels: list[str] | dict) -> list[str] | dict:
    """classes.json without a multi-label table's class counts: two checkpoints predict the same when theirs are equal."""
    if isinstance(labels, dict) and "multilabel" in labels:
        return {"multilabel": labels["multilabel"]}
    return labels


def load_task(config: Config) -> tuple[Records, Records, list[str] | dict, "Task"]:
    """The training and validation splits with their targets, what the labels define (fit_labels) and the task."""
    label, built = _labeller(config)
    train, val, defined = load_splits(config.data, config.seed, label, label_columns(config), _query(config),
                                      stratify=_stratified(config), cv=config.cv)
    return train, val, defined, built()


def load_table(config: Config) -> tuple[Records, list[str] | dict, "Task"]:
    """The whole training table (every row, in the table's order) with its targets, what its labels define, and the
    task: what a teacher's cached outputs and a soup's BatchNorm statistics are computed on."""
    label, built = _labeller(config)
    train, defined = load_training(config.data, label, label_columns(config), _query(config))
    return train, defined, built()


def load_folds(config: Config) -> tuple[Records, list[str] | dict, "Task", np.ndarray]:
    """Cross-validation (cv.folds): the whole training table with its targets, what its labels define, the task, and
    each row's fold -- the assignment every fold's run makes (data.assign_folds)."""
    label, built = _labeller(config)
    train, defined = load_training(config.data, label, label_columns(config), _query(config))
    seed = config.seed if config.cv.seed is None else config.cv.seed
    folds = assign_folds(train, config.cv.folds, seed, _stratified(config), str(split_source(config.data, "train").table),
                         config.data.cache_dir)
    return train, defined, built(), folds


def _query(config: Config) -> str | None:
    return config.task.query_column if config.task.kind == "ranking" else None


def _stratified(config: Config) -> bool:
    """Splits keep the label proportions where the task has one class per row (per head); multi-label rows are split
    as they come (scikit-learn has no multi-label stratification, and label sets as strata would be mostly singletons)."""
    return config.task.kind in ("classification", "multihead")


def _labeller(config: Config):
    """label(columns, where, defined) for data.load_splits -- the first call (the training table) decides what the labels
    define and builds the task -- and a function returning that task."""
    task = None

    def label(columns, where, defined):
        nonlocal task
        first = defined is None
        if first:
            defined = fit_labels(config, columns)
            sizes = {"": defined} if isinstance(defined, list) else defined.get("heads", {})
            for head, classes in sizes.items():
                if len(classes) < 2:
                    raise DataError(f"{where}{f', head {head}' if head else ''}: found {len(classes)} class; need at least 2")
            if isinstance(defined, dict) and "multilabel" in defined and len(defined["multilabel"]) < 2:
                raise DataError(f"{where}: {len(defined['multilabel'])} class name(s) in column {config.data.label_column!r}; "
                                f"task.kind=multilabel needs at least 2")
            task = build_task(config, defined)
        targets = task.encode(columns, where)
        if first and task.kind == "multilabel":
            defined = task.count(targets)
        return targets, defined

    return label, lambda: task


def load_records(cfg: DataConfig, seed: int) -> tuple[Records, Records, list[str]]:
    """Single-label classification: the training and validation splits, and the class names (index = target)."""
    train, val, classes, _ = load_task(Config(seed=seed, data=cfg))
    return train, val, classes


def task_for_datasets(config: Config, train_set) -> tuple[list[str] | dict, "Task"]:
    """What the labels define, and the task, for datasets of your own (Trainer, data.file): the classes come
    from the dataset's `classes` (or model.num_classes), multihead needs each head's `classes` in the config."""
    kind = config.task.kind
    if kind == "classification":
        labels = class_names(train_set, config.model.num_classes)
    elif kind == "multilabel":
        labels = {"multilabel": class_names(train_set, config.model.num_classes)}
    elif kind == "multihead":
        missing = [h.name for h in config.task.heads if h.classes is None]
        if missing:
            raise ConfigError(f"task.heads {', '.join(missing)}: with your own datasets each head needs its `classes`")
        labels = {"heads": {h.name: list(h.classes) for h in config.task.heads}}
    else:
        labels = fit_labels(config, {})
    return labels, build_task(config, labels)


def build_task(config: Config, labels: list[str] | dict) -> Task:
    kind = config.task.kind
    if kind == "classification":
        if not isinstance(labels, list):
            raise ConfigError(f"task.kind=classification, but the checkpoint was trained for another task ({labels})")
        return Classification(config, labels)
    if not isinstance(labels, dict):
        raise ConfigError(f"task.kind={kind}, but the checkpoint was trained for single-label classification")
    key = {"multihead": "heads", "multilabel": "multilabel", "regression": "targets"}.get(kind)
    if key is not None and key not in labels:
        raise ConfigError(f"task.kind={kind}, but the checkpoint was trained for another task ({', '.join(labels)})")
    if kind == "multilabel":
        return MultiLabel(config, labels)
    if kind == "multihead":
        return MultiHead(config, labels["heads"])
    if kind == "regression":
        return Regression(config, labels["targets"])
    return Ranking(config)
