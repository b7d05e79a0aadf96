"""What the model predicts: one class, several heads combined into one class, any number of classes (multi-label),
values (regression), or ranking scores.

A task turns label columns into targets, names the model's output size, its per-sample loss, its metrics
on the gathered outputs, and what the submission writes. Everything the loop does is the same for all.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dist_train.config import Config, DataConfig, monitorable
from dist_train.custom import class_names
from dist_train.data.columns import Column
from dist_train.data.splits import assign_folds, load_splits, load_training
from dist_train.data.tables import (Records, binary_column, encode_classes, encode_label_sets, float_column, label_set_names,
                                    sorted_labels, split_source)
from dist_train.errors import ConfigError, DataError
from dist_train.models.losses import build_loss, build_multilabel_loss, build_regression_loss
from dist_train.models.metrics import (classification_metrics, multilabel_metrics, ranking_metrics, regression_metrics,
                                       tune_thresholds)


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


def build_task(config: Config, labels: list[str] | dict) -> "Task":
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


class Task:
    """The interface the trainer and inference use; see the subclasses."""

    kind: str
    num_outputs: int
    class_names: list[str] | None = None
    """Names of the predicted classes (combined for multihead); None for values and scores."""

    def encode(self, columns: dict[str, Column], where: str) -> torch.Tensor:
        """Targets of the rows, one tensor row each: a class index (int64), several heads' indices (int64), or values
        (float32)."""
        raise NotImplementedError

    def loss(self) -> nn.Module:
        """Maps (outputs (N, num_outputs), targets) to per-sample losses (N,)."""
        raise NotImplementedError

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, groups=None) -> dict:
        """val_* numbers (and extras such as the confusion matrix) from the whole split's gathered outputs."""
        raise NotImplementedError

    def headline(self) -> list[str]:
        """The metrics the epoch line prints."""
        return monitorable(self.config)[:3]

    def average(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Several predictions of the same rows (test-time augmentation, an ensemble) made one: classes
        average their probabilities (returned as log-probabilities, so argmax and softmax still apply),
        values and scores average themselves."""
        return torch.stack(outputs).mean(0)

    def predictions(self, outputs: torch.Tensor) -> list[str]:
        """The submission's label column."""
        raise NotImplementedError

    def target_labels(self, targets: torch.Tensor) -> list[str]:
        """Targets written as predictions() writes its answers (class name, combined class id, value)."""
        return self.predictions(targets.float())

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """(N, len(class_names)) probabilities of the predicted classes (inference.probabilities)."""
        raise ConfigError(f"inference.probabilities: task.kind={self.kind} predicts no classes")


class Classification(Task):
    """One label column, one class per row (the digits run)."""

    kind = "classification"

    def __init__(self, config: Config, classes: list[str]):
        self.config, self.class_names, self.num_outputs = config, list(classes), len(classes)

    def encode(self, columns, where):
        return encode_classes(columns[self.config.data.label_column], self.class_names, where)

    def loss(self):
        return build_loss(self.config.loss, self.num_outputs)

    def metrics(self, outputs, targets, losses, groups=None):
        top_k = tuple(k for k in self.config.task.top_k if k < self.num_outputs)
        return classification_metrics(outputs, targets, losses, with_roc_auc=self.config.task.roc_auc, top_k=top_k)

    def headline(self):
        return ["val_loss", "val_accuracy", "val_f1_macro"]

    def average(self, outputs):
        return torch.stack([o.float().log_softmax(-1).exp() for o in outputs]).mean(0).log()

    def predictions(self, outputs):
        return [self.class_names[i] for i in outputs.argmax(1).tolist()]

    def target_labels(self, targets):
        return [self.class_names[i] for i in targets.tolist()]

    def probabilities(self, outputs):
        return outputs.float().softmax(1)


class MultiHead(Task):
    """Several heads over one backbone, each its own label column, loss and weight.

    The model's last layer has sum(head sizes) outputs, sliced in head order: one linear layer of
    sum(sizes) rows is exactly a separate linear head per task on the shared features. The combined class
    is the mixed-radix number of the head classes, in the order the heads are listed:
        combined = ((c_1 * n_2 + c_2) * n_3 + c_3) ...
    e.g. mask (3) x gender (2) x age (3): combined = 6 * mask + 3 * gender + age, 18 classes, named
    "wear/male/<30". Its probability is the product of the heads' (they are predicted independently).
    """

    kind = "multihead"

    def __init__(self, config: Config, heads: dict[str, list[str]]):
        self.config = config
        self.heads = config.task.heads
        missing = [h.name for h in self.heads if h.name not in heads]
        if missing:
            raise ConfigError(f"task.heads {missing} are not in the checkpoint's heads ({', '.join(heads)})")
        self.head_classes = [list(heads[h.name]) for h in self.heads]
        self.sizes = [len(c) for c in self.head_classes]
        self.num_outputs = sum(self.sizes)
        self.class_names = ["/".join(parts) for parts in _product(self.head_classes)]
        self.losses = nn.ModuleList(build_loss(h.loss, n) for h, n in zip(self.heads, self.sizes))

    def split(self, outputs: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(outputs, self.sizes, dim=1))

    def combine(self, head_classes: torch.Tensor) -> torch.Tensor:
        """(N, heads) class indices -> (N,) combined class indices."""
        combined = torch.zeros(len(head_classes), dtype=torch.long, device=head_classes.device)
        for h, size in enumerate(self.sizes):
            combined = combined * size + head_classes[:, h]
        return combined

    def encode(self, columns, where):
        per_head = [encode_classes(columns[h.column], classes, f"{where}, column {h.column!r}")
                    for h, classes in zip(self.heads, self.head_classes)]
        return torch.stack(per_head, 1)

    def loss(self):
        return _MultiHeadLoss(self)

    def metrics(self, outputs, targets, losses, groups=None):
        metrics = {"val_loss": losses.double().mean().item()}
        head_preds = []
        for h, (head, logits) in enumerate(zip(self.heads, self.split(outputs))):
            m = classification_metrics(logits, targets[:, h], losses)  # the loss slot is unused below
            for key in ("val_accuracy", "val_f1_macro", "val_precision_macro", "val_recall_macro"):
                metrics[f"val_{head.name}_{key[4:]}"] = m[key]
            metrics[f"{head.name}_confusion_matrix"] = m["confusion_matrix"]
            head_preds.append(logits.argmax(1))
        combined_logits = self.combined_log_probabilities(outputs)
        m = classification_metrics(combined_logits, self.combine(targets), losses)
        metrics.update({k: v for k, v in m.items() if k != "val_loss"})
        return metrics

    def combined_log_probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """(N, prod(sizes)) log-probabilities of the combined classes: sums of the heads' log-probabilities."""
        total = torch.zeros(len(outputs), 1, device=outputs.device)
        for logits in self.split(outputs.float()):
            total = (total[:, :, None] + logits.log_softmax(1)[:, None, :]).flatten(1)
        return total

    def headline(self):
        return ["val_loss", "val_accuracy", *[f"val_{h.name}_accuracy" for h in self.heads]]

    def average(self, outputs):
        heads = zip(*(self.split(o.float()) for o in outputs))
        return torch.cat([torch.stack([v.softmax(1) for v in views]).mean(0).log() for views in heads], dim=1)

    def predictions(self, outputs):
        return [str(c) for c in self.combined_log_probabilities(outputs).argmax(1).tolist()]

    def target_labels(self, targets):
        return [str(c) for c in self.combine(targets).tolist()]

    def probabilities(self, outputs):
        return self.combined_log_probabilities(outputs).exp()


class _MultiHeadLoss(nn.Module):
    """sum over heads of weight * the head's per-sample loss."""

    def __init__(self, task: MultiHead):
        super().__init__()
        self.task = task
        self.losses = task.losses
        self.weights = [h.weight for h in task.heads]

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for h, (loss, logits) in enumerate(zip(self.losses, self.task.split(outputs))):
            total = total + self.weights[h] * loss(logits, targets[:, h])
        return total


class MultiLabel(Task):
    """Any number of classes per row, each present or not: one logit per class, a sigmoid each, a binary loss (bce, focal,
    asl), threshold-free mAP and F1 at the decision thresholds -- task.threshold for every class, or (tune) one per class
    tuned on the validation predictions (thresholds_for). The submission writes each row's predicted classes, joined by
    task.label_separator (the Kaggle layout: `id,label` / `p001,3 7 12`)."""

    kind = "multilabel"

    def __init__(self, config: Config, labels: dict):
        self.config, self.class_names = config, list(labels["multilabel"])
        self.num_outputs = len(self.class_names)
        if self.num_outputs < 2:  # (scikit-learn's per-row scores need two columns; one class is binary classification)
            raise ConfigError(f"task.kind=multilabel needs at least 2 classes, not {self.class_names}: one class present or "
                              f"not is task.kind=classification with 2 classes")
        self.positives, self.rows = labels.get("positives"), labels.get("rows")
        threshold = config.task.threshold
        # one per class; None (task.threshold=tune) until tuned ones are given, metrics() tuning them on what it scores
        self.thresholds = None if threshold == "tune" else np.full(self.num_outputs, float(threshold))

    def use_thresholds(self, thresholds) -> None:
        values = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        if len(values) != self.num_outputs:
            raise ConfigError(f"{len(values)} thresholds for {self.num_outputs} classes")
        self.thresholds = values

    def thresholds_for(self, outputs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
        """The thresholds to score these rows with: the fixed or given ones, else tuned on them (task.threshold=tune)."""
        if self.thresholds is not None:
            return self.thresholds
        return tune_thresholds(outputs.float().sigmoid(), targets, self.config.task.threshold_beta)

    def encode(self, columns, where):
        if self.config.task.targets:
            return torch.stack([binary_column(columns[c], f"{where}, column {c!r}") for c in self.config.task.targets], 1)
        column = self.config.data.label_column
        return encode_label_sets(columns[column], self.class_names, self.config.task.label_separator,
                                 f"{where}, column {column!r}")

    def count(self, targets: torch.Tensor) -> dict:
        """What the training table's labels define: the classes, each one's positive rows and the number of rows."""
        self.positives, self.rows = [int(n) for n in (targets > 0.5).sum(0).tolist()], len(targets)
        return {"multilabel": self.class_names, "positives": self.positives, "rows": self.rows}

    def loss(self):
        return build_multilabel_loss(self.config.loss, self.num_outputs, self.positives, self.rows)

    def metrics(self, outputs, targets, losses, groups=None):
        return self.metrics_at(outputs, targets, losses, self.thresholds_for(outputs, targets))

    def metrics_at(self, outputs, targets, losses, thresholds) -> dict:
        """metrics() at these thresholds (one per class, or a row of them per row)."""
        return {"val_loss": losses.double().mean().item(),
                **multilabel_metrics(outputs.float().sigmoid(), targets, thresholds)}

    def headline(self):
        return ["val_loss", "val_map_macro", "val_f1_samples"]

    def average(self, outputs):
        """The classes' probabilities averaged, as logits again (so that a sigmoid still gives them)."""
        return torch.logit(torch.stack([o.float().sigmoid() for o in outputs]).mean(0), eps=1e-7)

    def predictions(self, outputs):
        if self.thresholds is None:
            raise ValueError("multilabel predictions need thresholds: tuned ones given (use_thresholds) or task.threshold")
        return self.predictions_at(outputs, self.thresholds)

    def predictions_at(self, outputs, thresholds) -> list[str]:  # (thresholds: one per class, or a row of them per row)
        thresholds = np.asarray(thresholds, dtype=np.float64)
        return self._joined(outputs.float().sigmoid().numpy() >= (thresholds if thresholds.ndim == 2 else thresholds[None, :]))

    def target_labels(self, targets):
        return self._joined(targets.numpy() > 0.5)

    def probabilities(self, outputs):
        return outputs.float().sigmoid()

    def _joined(self, present: np.ndarray) -> list[str]:
        names, separator = self.class_names, self.config.task.label_separator
        return [separator.join(names[c] for c in np.flatnonzero(row)) for row in present]


def multilabel_classes(config: Config, columns: dict) -> list[str]:
    """The classes of a multi-label task: task.targets (one 0/1 column per class), else data.classes, else the sorted
    union of the class names in the training table's data.label_column."""
    if config.task.targets:
        return list(config.task.targets)
    if config.data.classes is not None:
        return list(config.data.classes)
    return sorted_labels(label_set_names(columns[config.data.label_column], config.task.label_separator))


class Regression(Task):
    """One or more numeric columns; the model's outputs are the values (an MSE, L1 or Huber loss)."""

    kind = "regression"

    def __init__(self, config: Config, targets: list[str]):
        self.config, self.columns, self.num_outputs = config, list(targets), len(targets)

    def encode(self, columns, where):
        return torch.stack([float_column(columns[c], f"{where}, column {c!r}") for c in self.columns], 1).float()

    def loss(self):
        return build_regression_loss(self.config.task.loss, self.config.task.huber_delta)

    def metrics(self, outputs, targets, losses, groups=None):
        return {"val_loss": losses.double().mean().item(), **regression_metrics(outputs, targets),
                "val_samples": len(targets)}

    def headline(self):
        return ["val_loss", "val_mae", "val_rmse"]

    def predictions(self, outputs):
        if self.num_outputs == 1:
            return [f"{v:.6g}" for v in outputs.float().reshape(-1).tolist()]
        return [" ".join(f"{v:.6g}" for v in row) for row in outputs.float().tolist()]


class Ranking(Task):
    """Rows grouped by a query column, each with a relevance (>= 0): the model scores each row, pointwise
    (a regression of the relevance), and MRR, NDCG@k and MAP rank the rows of each query by score."""

    kind = "ranking"
    num_outputs = 1

    def __init__(self, config: Config):
        self.config = config

    def encode(self, columns, where):
        values = float_column(columns[self.config.data.label_column], f"{where}, column {self.config.data.label_column!r}")
        if bool((values < 0).any()):
            raise DataError(f"{where}: relevance values must be >= 0")
        return values.float()

    def loss(self):
        return build_regression_loss(self.config.task.loss, self.config.task.huber_delta)

    def metrics(self, outputs, targets, losses, groups=None):
        if groups is None:
            raise ValueError("ranking metrics need the query of every row")
        return {"val_loss": losses.double().mean().item(),
                **ranking_metrics(outputs.float().reshape(-1), targets.float(), groups, k=self.config.task.ndcg_k),
                "val_samples": len(targets)}

    def headline(self):
        return ["val_loss", "val_mrr", f"val_ndcg@{self.config.task.ndcg_k}", "val_map"]

    def predictions(self, outputs):
        return [f"{v:.6g}" for v in outputs.float().reshape(-1).tolist()]


def _product(lists: list[list[str]]) -> list[list[str]]:
    combos = [[]]
    for options in lists:
        combos = [c + [o] for c in combos for o in options]
    return combos


