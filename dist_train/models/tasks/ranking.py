"""Ranking: rows grouped by a query, scored pointwise, ranked by MRR, NDCG@k and MAP."""
from __future__ import annotations


from dist_train.config import Config
from dist_train.data.tables import float_column
from dist_train.errors import DataError
from dist_train.models.losses import build_regression_loss
from dist_train.models.metrics import ranking_metrics
from dist_train.models.tasks.base import Task


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
