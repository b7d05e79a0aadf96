"""What the model predicts: one class, several heads combined into one class, any number of classes (multi-label),
values (regression), or ranking scores.

A task turns label columns into targets, names the model's output size, its per-sample loss, its metrics
on the gathered outputs, and what the submission writes. Everything the loop does is the same for all.

    base.py            Task: the interface the loop and inference use
    classification.py  one class per row
    multihead.py       several heads combined into one class
    multilabel.py      any number of classes per row, decision thresholds
    regression.py      values
    ranking.py         scores ranked per query
    loading.py         a config's labels to targets: the splits, the folds, the whole table, the task built for them
"""
from dist_train.models.tasks.base import Task
from dist_train.models.tasks.classification import Classification
from dist_train.models.tasks.loading import (build_task, fit_labels, label_columns, label_names, load_folds, load_records,
                                             load_table, load_task, task_for_datasets)
from dist_train.models.tasks.multihead import MultiHead
from dist_train.models.tasks.multilabel import MultiLabel, multilabel_classes
from dist_train.models.tasks.ranking import Ranking
from dist_train.models.tasks.regression import Regression

__all__ = ["Task", "Classification", "MultiHead", "MultiLabel", "Regression", "Ranking", "build_task", "fit_labels",
           "label_columns", "label_names", "load_folds", "load_records", "load_table", "load_task", "task_for_datasets",
           "multilabel_classes"]
