"""Metrics of a whole gathered split (tensors in, python floats out), computed by scikit-learn wherever it has the
metric; each is defined once, here."""
from __future__ import annotations

import numpy as np
import torch


class _Sklearn:
    """scikit-learn's metrics, imported at the first evaluation rather than at start-up (about a second before the
    first optimizer step on 2 cores)."""

    def __getattr__(self, name: str):
        from sklearn import metrics

        return getattr(metrics, name)


sk = _Sklearn()


def classification_metrics(
    logits: torch.Tensor,
    targets: torch.Tensor,
    losses: torch.Tensor,
    *,
    with_roc_auc: bool = False,
    top_k: tuple[int, ...] = (),
) -> dict:
    """Accuracy, macro precision/recall/F1, per-class F1, the confusion matrix and the per-sample mean loss.

    Every class of the model's output counts in the macro averages (scikit-learn's `labels=range(C)`), a class
    absent from both targets and predictions with precision, recall and F1 of 0 (`zero_division=0`). Rows with
    a negative target (unreadable images skipped under data.bad_samples=skip) are left out.

    Opt-in extras (off by default so the usual keys stay exactly as they were): `with_roc_auc` adds
    `val_roc_auc` (see `roc_auc`, on softmax probabilities) and each k in `top_k` adds `val_top{k}_accuracy`.
    """
    readable = targets >= 0
    if not bool(readable.all()):
        logits, targets, losses = logits[readable], targets[readable], losses[readable]
    labels = np.arange(logits.shape[1])
    y, predicted = targets.long().numpy(), logits.argmax(dim=1).numpy()
    precision, recall, f1, _ = sk.precision_recall_fscore_support(y, predicted, labels=labels, zero_division=0)
    cm = sk.confusion_matrix(y, predicted, labels=labels)
    metrics = {
        "val_loss": losses.double().mean().item(),
        "val_accuracy": float(sk.accuracy_score(y, predicted)),
        "val_f1_macro": float(f1.mean()),
        "val_precision_macro": float(precision.mean()),
        "val_recall_macro": float(recall.mean()),
        "val_samples": int(cm.sum()),
        "per_class_f1": f1.tolist(),
        "confusion_matrix": cm.tolist(),
    }
    if with_roc_auc:
        metrics["val_roc_auc"] = roc_auc(logits.double().softmax(dim=1), targets)
    for k in top_k:
        metrics[f"val_top{k}_accuracy"] = top_k_accuracy(logits, targets, k)
    return metrics


def roc_auc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Area under the ROC curve (scikit-learn's `roc_auc_score`).

    Binary: `scores` is 1-D (score of class 1) or (N, 2) probabilities, targets in {0, 1}.
    Multi-class (N, C > 2): one-vs-rest, macro average over classes, as `roc_auc_score(y, p, multi_class="ovr",
    average="macro")` when every class is present. A class with no positive or no negative sample has no ROC
    curve (scikit-learn raises); it is left out of the average instead, so a small validation split missing a
    class still gets a number. NaN when no class is left (e.g. a binary split with one class only).
    """
    y = targets.long().numpy()
    scores = scores.double().numpy()
    if scores.ndim == 2 and scores.shape[1] == 2:
        scores = scores[:, 1]
    if scores.ndim == 1:
        columns, positives = scores[:, None], (y == 1)[:, None]
    else:
        columns, positives = scores, y[:, None] == np.arange(scores.shape[1])
    aucs = [sk.roc_auc_score(positives[:, c], columns[:, c]) for c in range(columns.shape[1])
            if 0 < positives[:, c].sum() < len(y)]
    return float(np.mean(aucs)) if aucs else float("nan")


def top_k_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Fraction of samples whose target is among the k highest scores: scikit-learn's
    `top_k_accuracy_score(y, scores, k=k, labels=range(C))` (binary: on the probability of class 1)."""
    scores = logits.double()
    if scores.shape[1] == 2:
        scores = scores.softmax(dim=1)[:, 1]
    return float(sk.top_k_accuracy_score(targets.long().numpy(), scores.numpy(), k=k, labels=np.arange(logits.shape[1])))


def regression_metrics(preds: torch.Tensor, targets: torch.Tensor) -> dict:
    """Mean absolute error, mean squared error and its root, over all elements.

    With several outputs per sample the MAE and MSE are scikit-learn's `multioutput="uniform_average"`;
    `val_rmse` is sqrt(val_mse), not scikit-learn's mean of per-output RMSEs. `preds` is reshaped to the
    targets' shape so that (N, 1) predictions against (N,) targets cannot broadcast to (N, N).
    """
    y = targets.double().numpy()
    predicted = preds.double().reshape(targets.shape).numpy()
    mse = float(sk.mean_squared_error(y, predicted))
    return {"val_mae": float(sk.mean_absolute_error(y, predicted)), "val_mse": mse, "val_rmse": mse**0.5}


def ranking_metrics(scores: torch.Tensor, relevance: torch.Tensor, query_ids: torch.Tensor, k: int = 10) -> dict:
    """MRR, NDCG@k and MAP over queries; rows of a query may come in any order, interleaved with others.

    Each is averaged over queries and none depends on row order, ties included:
    - NDCG@k: scikit-learn's `ndcg_score(k=k)` per query (linear gains = relevance; tied scores share the
      average gain of their group); a query of one row scores 1 when that row is relevant.
    - MAP: scikit-learn's `average_precision_score` per query with relevant = relevance > 0 (a tied group is one
      threshold), computed as its `label_ranking_average_precision_score`, which is the same number per query
      (the precision at each relevant row's tied group's end, averaged) without a call per query.
    - MRR (scikit-learn has none): 1 / rank of the first relevant row, where a relevant row tied with
      non-relevant rows ranks after them, so a constant scorer earns no credit from the dataset's row order.
    A query with no relevant row scores 0 on all three (as scikit-learn's ndcg), so the three share one
    denominator, the number of queries. Queries are laid out as rows of a matrix, padded with rows that are not
    relevant and score below every real one (so they change nothing), a few thousand cells per chunk.
    """
    if bool((relevance < 0).any()):
        raise ValueError("ranking_metrics: relevance must be >= 0")
    scores, relevance = scores.double().numpy(), relevance.double().numpy()
    _, query, sizes = np.unique(query_ids.numpy(), return_inverse=True, return_counts=True)
    rows = np.lexsort((relevance, scores, query))  # by query, then a canonical order: sums never depend on row order
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    floor = scores.min() - 1.0 if len(scores) else 0.0
    totals = np.zeros(3)  # mrr, ndcg, map summed over queries
    for chunk in _chunks(np.argsort(sizes, kind="stable"), sizes):
        width = sizes[chunk].max()
        s, r = np.full((len(chunk), width), floor), np.zeros((len(chunk), width))
        for i, q in enumerate(chunk):
            picked = rows[starts[q]:starts[q] + sizes[q]]
            s[i, :sizes[q]], r[i, :sizes[q]] = scores[picked], relevance[picked]
        relevant = r > 0
        some = relevant.any(1)
        if not some.any():
            continue
        best = np.where(relevant, s, -np.inf).max(1, keepdims=True)
        totals[0] += (1.0 / (1 + ((s >= best) & ~relevant).sum(1)))[some].sum()
        totals[1] += sk.ndcg_score(r, s, k=k) * len(chunk) if width > 1 else some.sum()
        totals[2] += sk.label_ranking_average_precision_score(relevant[some], s[some]) * some.sum()
    mrr, ndcg, ap = totals / max(len(sizes), 1)
    return {"val_mrr": float(mrr), f"val_ndcg@{k}": float(ndcg), "val_map": float(ap)}


def _chunks(queries: np.ndarray, sizes: np.ndarray, cells: int = 1 << 22):
    """`queries` (shortest first) in runs whose padded matrix stays under `cells` cells."""
    start = 0
    while start < len(queries):
        end = start + 1
        while end < len(queries) and (end + 1 - start) * sizes[queries[end]] <= cells:
            end += 1
        yield queries[start:end]
        start = end


def multilabel_metrics(probabilities: torch.Tensor, targets: torch.Tensor, thresholds) -> dict:
    """Multi-label scores of (N, C) probabilities against (N, C) 0/1 targets, a class predicted where its probability
    reaches its threshold (`thresholds`: one per class, or one row of them per row: a cross-validation's rows each scored
    with their fold's).

    - val_map_macro: scikit-learn's `average_precision_score` per class, averaged over the classes that have a positive
      row (a class without one has no precision-recall curve: left out, as `roc_auc` leaves such classes out);
      val_map_micro: over every (row, class) cell at once (`average="micro"`). Neither depends on the thresholds.
    - val_f1_macro / val_precision_macro / val_recall_macro: scikit-learn's, `zero_division=0`, averaged over the classes
      that have a positive row or a predicted one (a class absent from both has nothing to score: left out, as from
      mAP); val_f1_micro over every cell; val_f1_samples: per row, averaged, where a row with no true and no predicted
      class scores 1 (nothing missed, nothing wrong: `zero_division=1`, which only that row's F1 reaches).
    - val_hamming_loss: the fraction of wrong cells; val_exact_match: the fraction of rows whose set is exactly right.
    - per_class_ap (None for a class without positives), per_class_f1, thresholds: lists, one entry per class.
    """
    y = (targets.double().numpy() > 0.5).astype(np.int64)
    p = probabilities.double().numpy()
    thresholds = np.asarray(thresholds, dtype=np.float64)
    predicted = (p >= (thresholds if thresholds.ndim == 2 else thresholds.reshape(1, -1))).astype(np.int64)
    present = y.sum(0) > 0
    ap = [float(sk.average_precision_score(y[:, c], p[:, c])) if present[c] else None for c in range(y.shape[1])]
    known = [a for a in ap if a is not None]
    f1 = sk.f1_score(y, predicted, average=None, zero_division=0)
    scored = np.flatnonzero(present | predicted.any(0))
    macro = {"labels": scored, "average": "macro", "zero_division": 0}
    return {
        "val_map_macro": float(np.mean(known)) if known else float("nan"),
        "val_map_micro": float(sk.average_precision_score(y.ravel(), p.ravel())) if present.any() else float("nan"),
        "val_f1_macro": float(f1[scored].mean()) if len(scored) else 1.0,
        "val_f1_micro": float(sk.f1_score(y, predicted, average="micro", zero_division=0)),
        "val_f1_samples": float(sk.f1_score(y, predicted, average="samples", zero_division=1)),
        "val_precision_macro": float(sk.precision_score(y, predicted, **macro)) if len(scored) else 1.0,
        "val_recall_macro": float(sk.recall_score(y, predicted, **macro)) if len(scored) else 1.0,
        "val_hamming_loss": float(sk.hamming_loss(y, predicted)),
        "val_exact_match": float(sk.accuracy_score(y, predicted)),
        "val_samples": int(len(y)),
        "per_class_ap": ap,
        "per_class_f1": f1.tolist(),
        **({"thresholds": thresholds.tolist()} if thresholds.ndim == 1 else {}),
    }


def tune_thresholds(probabilities: torch.Tensor, targets: torch.Tensor, beta: float = 1.0, default: float = 0.5) -> np.ndarray:
    """One threshold per class, the one maximising that class's F-beta on these rows (a class is predicted where its
    probability is >= its threshold).

    Every way of cutting a class's sorted probabilities is tried at once (cumulative true and false positives; tied
    probabilities cut together); of equal scores the highest cut wins (the fewest predicted rows). The threshold is
    the midpoint between the lowest probability kept and the next lower one (half the lowest when every row is kept),
    so that a row between the two goes the way of its neighbours. A class without a positive row gets `default`.
    scikit-learn has no such search (its TunedThresholdClassifierCV tunes one binary estimator at a time by refitting it).
    """
    y = targets.double().numpy() > 0.5
    p = probabilities.double().numpy()
    thresholds = np.full(p.shape[1], float(default))
    b2 = beta * beta
    for c in range(p.shape[1]):
        positives = y[:, c].sum()
        if positives == 0:
            continue
        order = np.argsort(-p[:, c], kind="stable")
        scores, truth = p[order, c], y[order, c]
        tp, fp = np.cumsum(truth), np.cumsum(~truth)
        ends = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])  # the last row of each tied group
        f = (1 + b2) * tp[ends] / ((1 + b2) * tp[ends] + b2 * (positives - tp[ends]) + fp[ends])
        best = ends[int(np.argmax(f))]
        below = scores[best + 1] if best + 1 < len(scores) else 0.0
        thresholds[c] = (scores[best] + below) / 2
    return thresholds
