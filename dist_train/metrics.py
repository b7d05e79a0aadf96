"""Metrics on whole gathered per-sample tensors (tensors in, python floats out), each implemented once."""
from __future__ import annotations

import torch


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted]."""
    flat = targets.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(
    logits: torch.Tensor,
    targets: torch.Tensor,
    losses: torch.Tensor,
    *,
    with_roc_auc: bool = False,
    top_k: tuple[int, ...] = (),
) -> dict:
    """Accuracy, macro precision/recall/F1, per-class F1, the confusion matrix and the per-sample mean loss.

    Classes absent from both targets and predictions get F1 = 0 and count in the macro average, as in
    scikit-learn's `zero_division=0`. Rows with a negative target (unreadable images skipped under
    data.bad_samples=skip) are left out.

    Opt-in extras (off by default so the usual keys stay exactly as they were): `with_roc_auc` adds
    `val_roc_auc` (see `roc_auc`, on softmax probabilities) and each k in `top_k` adds `val_top{k}_accuracy`.
    """
    readable = targets >= 0
    if not bool(readable.all()):
        logits, targets, losses = logits[readable], targets[readable], losses[readable]
    num_classes = logits.shape[1]
    preds = logits.argmax(dim=1)
    cm = confusion_matrix(preds, targets, num_classes).double()
    tp = cm.diag()
    predicted = cm.sum(0)
    actual = cm.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    metrics = {
        "val_loss": losses.double().mean().item(),
        "val_accuracy": (tp.sum() / cm.sum()).item(),
        "val_f1_macro": f1.mean().item(),
        "val_precision_macro": precision.mean().item(),
        "val_recall_macro": recall.mean().item(),
        "val_samples": int(cm.sum().item()),
        "per_class_f1": f1.tolist(),
        "confusion_matrix": cm.long().tolist(),
    }
    if with_roc_auc:
        metrics["val_roc_auc"] = roc_auc(logits.double().softmax(dim=1), targets)
    for k in top_k:
        metrics[f"val_top{k}_accuracy"] = top_k_accuracy(logits, targets, k)
    return metrics


def is_improvement(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def _binary_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Mann-Whitney U with average ranks for ties: equal to the trapezoid area under the ROC curve,
    which is how scikit-learn counts a positive tied with a negative (one half)."""
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    average_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based rank of each distinct score
    ranks = average_rank[inverse]
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    u = ranks[positive].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def roc_auc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Area under the ROC curve.

    Binary: `scores` is 1-D (score of class 1) or (N, 2) probabilities, targets in {0, 1}.
    Multi-class (N, C > 2): one-vs-rest, macro average over classes, as scikit-learn's
    `roc_auc_score(y, p, multi_class="ovr", average="macro")` when every class is present. A class with no
    positive or no negative sample has no ROC curve (scikit-learn raises); it is left out of the average
    instead, so a small validation split missing a class still gets a number. NaN when no class is left
    (e.g. a binary split with one class only).
    """
    targets = targets.long()
    if scores.ndim == 2 and scores.shape[1] == 2:
        scores = scores[:, 1]
    if scores.ndim == 1:
        columns, positives = scores[:, None], (targets == 1)[:, None]
    else:
        columns, positives = scores, targets[:, None] == torch.arange(scores.shape[1], device=targets.device)
    aucs = [
        _binary_auc(columns[:, c], positives[:, c])
        for c in range(columns.shape[1])
        if 0 < int(positives[:, c].sum()) < len(targets)
    ]
    return sum(aucs) / len(aucs) if aucs else float("nan")


def top_k_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Fraction of samples whose target is among the k highest scores, as scikit-learn's
    `top_k_accuracy_score(y, logits, k=k, labels=range(C))`.

    Ties follow scikit-learn's ordering (a stable ascending sort, reversed): a class tied with the target
    ranks ahead of it when its index is higher. Counting instead of sorting keeps that exact on any device.
    """
    target_scores = logits.gather(1, targets.long()[:, None])
    classes = torch.arange(logits.shape[1], device=logits.device)
    ahead = (logits > target_scores) | ((logits == target_scores) & (classes > targets[:, None]))
    return (ahead.sum(1) < k).double().mean().item()


def regression_metrics(preds: torch.Tensor, targets: torch.Tensor) -> dict:
    """Mean absolute error, mean squared error and its root, over all elements.

    With several outputs per sample the MAE and MSE equal scikit-learn's `multioutput="uniform_average"`;
    `val_rmse` is sqrt(val_mse), not scikit-learn's mean of per-output RMSEs. `preds` is reshaped to the
    targets' shape so that (N, 1) predictions against (N,) targets cannot broadcast to (N, N).
    """
    errors = preds.double().reshape(targets.shape) - targets.double()
    mse = errors.square().mean().item()
    return {"val_mae": errors.abs().mean().item(), "val_mse": mse, "val_rmse": mse**0.5}


def _segment_sum(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    return torch.zeros(n_segments, dtype=torch.float64, device=values.device).index_add_(0, segment, values.double())


def _sorted_within_queries(query_ids: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Row order grouping rows by query and sorting each query by `key`, descending."""
    order = torch.sort(key, descending=True, stable=True).indices
    return order[torch.sort(query_ids[order], stable=True).indices]


def ranking_metrics(scores: torch.Tensor, relevance: torch.Tensor, query_ids: torch.Tensor, k: int = 10) -> dict:
    """MRR, NDCG@k and MAP over queries; rows of a query may come in any order, interleaved with others.

    Each is averaged over queries and none depends on row order, ties included:
    - NDCG@k: scikit-learn's `ndcg_score(k=k)` per query (linear gains = relevance; tied scores share the
      average gain of their group).
    - MAP: scikit-learn's `average_precision_score` per query with relevant = relevance > 0 (a tied group
      is one threshold).
    - MRR: 1 / rank of the first relevant row, where a relevant row tied with non-relevant rows ranks
      after them, so a constant scorer earns no credit from the dataset's row order.
    A query with no relevant row scores 0 on all three (scikit-learn's ndcg and average precision give 0
    too), so the three share one denominator, the number of queries.
    """
    if bool((relevance < 0).any()):
        raise ValueError("ranking_metrics: relevance must be >= 0")
    order = _sorted_within_queries(query_ids, scores)
    query_ids, scores, relevance = query_ids[order], scores[order].double(), relevance[order].double()
    n = len(scores)
    starts_query = torch.ones(n, dtype=torch.bool, device=scores.device)
    starts_query[1:] = query_ids[1:] != query_ids[:-1]
    starts_group = starts_query.clone()  # a group: rows of one query with one score (a tie)
    starts_group[1:] |= scores[1:] != scores[:-1]
    ends_group = torch.ones_like(starts_group)
    ends_group[:-1] = starts_group[1:]
    query = starts_query.cumsum(0) - 1
    group = starts_group.cumsum(0) - 1
    n_queries, n_groups = int(query[-1]) + 1, int(group[-1]) + 1
    position = torch.arange(n, device=scores.device) - starts_query.nonzero().squeeze(1)[query]  # 0-based rank
    group_query = query[starts_group]
    group_size = _segment_sum(torch.ones_like(scores), group, n_groups)

    # NDCG@k: tied rows share their group's mean gain, spread over the group's positions
    discount = torch.where(position < k, 1 / torch.log2(position + 2.0), 0.0)
    group_mean_gain = _segment_sum(relevance, group, n_groups) / group_size
    dcg = _segment_sum(group_mean_gain * _segment_sum(discount, group, n_groups), group_query, n_queries)
    ideal = relevance[_sorted_within_queries(query, relevance)]  # same query blocks, best first
    ideal_dcg = _segment_sum(ideal * discount, query, n_queries)
    ndcg = torch.where(ideal_dcg > 0, dcg / ideal_dcg.clamp(min=1e-300), 0.0)

    # average precision: one term per tied group, at the precision reached at the group's end
    relevant = (relevance > 0).double()
    n_relevant = _segment_sum(relevant, query, n_queries)
    group_relevant = _segment_sum(relevant, group, n_groups)
    cumulative = relevant.cumsum(0)
    relevant_seen = (cumulative - (cumulative - relevant)[starts_query][query])[ends_group]  # within the query
    precision_at_group_end = relevant_seen / (position[ends_group] + 1)
    ap = _segment_sum(group_relevant * precision_at_group_end, group_query, n_queries)
    ap = torch.where(n_relevant > 0, ap / n_relevant.clamp(min=1), 0.0)

    # reciprocal rank: the first group holding a relevant row, its non-relevant rows counted ahead
    has_relevant = group_relevant > 0
    rank = position[starts_group] + (group_size - group_relevant) + 1  # rank if this group held the first hit
    first_rank = torch.full((n_queries,), float("inf"), dtype=torch.float64, device=scores.device)
    first_rank.scatter_reduce_(0, group_query[has_relevant], rank[has_relevant], reduce="amin")
    return {"val_mrr": (1 / first_rank).mean().item(), f"val_ndcg@{k}": ndcg.mean().item(), "val_map": ap.mean().item()}
