"""Metrics agree with scikit-learn, including classes absent from a split, ties and any row order."""
import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    ndcg_score,
    precision_score,
    recall_score,
    roc_auc_score,
    root_mean_squared_error,
    top_k_accuracy_score,
)

from dist_train.models.metrics import (
    classification_metrics,
    ranking_metrics,
    regression_metrics,
    roc_auc,
    top_k_accuracy,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(200, 6, generator=g)
    targets = torch.randint(0, 5, (200,), generator=g)  # class 5 never occurs as a target
    losses = torch.rand(200, generator=g)
    m = classification_metrics(logits, targets, losses)
    y, p = targets.numpy(), logits.argmax(1).numpy()
    labels = list(range(6))
    assert m["val_accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["val_f1_macro"] == pytest.approx(f1_score(y, p, labels=labels, average="macro", zero_division=0))
    assert m["val_precision_macro"] == pytest.approx(precision_score(y, p, labels=labels, average="macro", zero_division=0))
    assert m["val_recall_macro"] == pytest.approx(recall_score(y, p, labels=labels, average="macro", zero_division=0))
    assert np.allclose(m["per_class_f1"], f1_score(y, p, labels=labels, average=None, zero_division=0))
    assert m["confusion_matrix"] == confusion_matrix(y, p, labels=labels).tolist()
    assert m["val_loss"] == pytest.approx(losses.double().mean().item())
    assert m["val_samples"] == 200


def _ties(x: torch.Tensor) -> torch.Tensor:
    """Coarse scores so that many are tied."""
    return (x * 2).round() / 2


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tied", [False, True])
def test_roc_auc_against_sklearn(seed, tied):
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(300, 4, generator=g).softmax(1)
    if tied:
        probs = (probs * 4).round() / 4
        probs = probs / probs.sum(1, keepdim=True)  # sklearn requires rows summing to 1
    targets = torch.randint(0, 4, (300,), generator=g)
    assert roc_auc(probs, targets) == pytest.approx(roc_auc_score(targets, probs, multi_class="ovr", average="macro"))
    binary = targets % 2
    scores = _ties(torch.randn(300, generator=g)) if tied else torch.randn(300, generator=g)
    expected = roc_auc_score(binary, scores)
    assert roc_auc(scores, binary) == pytest.approx(expected)
    assert roc_auc(torch.stack([1 - scores, scores], 1), binary) == pytest.approx(expected)


def test_roc_auc_skips_classes_without_positives():
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(100, 4, generator=g).softmax(1)
    targets = torch.randint(0, 3, (100,), generator=g)  # class 3 absent
    per_class = [roc_auc_score(targets == c, probs[:, c]) for c in range(3)]
    assert roc_auc(probs, targets) == pytest.approx(np.mean(per_class))
    assert np.isnan(roc_auc(torch.rand(10), torch.zeros(10, dtype=torch.long)))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.filterwarnings("ignore:.k. \(5\) greater than or equal")
def test_top_k_accuracy_against_sklearn_with_ties(seed, k):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(300, 5, generator=g).round()  # many ties
    targets = torch.randint(0, 5, (300,), generator=g)
    expected = top_k_accuracy_score(targets, logits, k=k, labels=range(5))
    assert top_k_accuracy(logits, targets, k) == pytest.approx(expected)


def test_classification_metrics_extras_are_opt_in():
    g = torch.Generator().manual_seed(0)
    logits, targets, losses = torch.randn(50, 6, generator=g), torch.randint(0, 6, (50,), generator=g), torch.rand(50)
    plain = classification_metrics(logits, targets, losses)
    extra = classification_metrics(logits, targets, losses, with_roc_auc=True, top_k=(3,))
    assert set(extra) - set(plain) == {"val_roc_auc", "val_top3_accuracy"}
    assert extra["val_roc_auc"] == pytest.approx(roc_auc(logits.softmax(1), targets))
    assert extra["val_top3_accuracy"] == pytest.approx(top_k_accuracy(logits, targets, 3))


@pytest.mark.parametrize("seed", [0, 1])
def test_regression_metrics_against_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    preds, targets = torch.randn(100, 3, generator=g), torch.randn(100, 3, generator=g)
    m = regression_metrics(preds, targets)
    assert m["val_mae"] == pytest.approx(mean_absolute_error(targets, preds))
    assert m["val_mse"] == pytest.approx(mean_squared_error(targets, preds))
    assert m["val_rmse"] == pytest.approx(m["val_mse"] ** 0.5)
    single = regression_metrics(preds[:, :1], targets[:, 0])  # (N, 1) against (N,): no broadcasting
    assert single["val_rmse"] == pytest.approx(root_mean_squared_error(targets[:, 0], preds[:, 0]))


def _ranking_by_sklearn(scores, relevance, query_ids, k):
    """Per-query scikit-learn values; MRR by its definition with ties ranked against the relevant row."""
    mrr, ndcg, ap = [], [], []
    for q in np.unique(query_ids):
        s, r = scores[query_ids == q], relevance[query_ids == q]
        ndcg.append(ndcg_score(r[None], s[None], k=k))
        if (r > 0).any():
            ap.append(average_precision_score(r > 0, s))
            best = s[r > 0].max()
            mrr.append(1 / (1 + ((s >= best) & (r == 0)).sum()))
        else:
            ap.append(0.0)
            mrr.append(0.0)
    return {"val_mrr": np.mean(mrr), f"val_ndcg@{k}": np.mean(ndcg), "val_map": np.mean(ap)}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tied", [False, True])
def test_ranking_metrics_against_sklearn_any_row_order(seed, tied):
    g = torch.Generator().manual_seed(seed)
    n, k = 600, 5
    query_ids = torch.randint(0, 40, (n,), generator=g) * 7  # interleaved, non-contiguous ids
    scores = torch.randn(n, generator=g)
    if tied:
        scores = _ties(scores)
    relevance = torch.randint(0, 4, (n,), generator=g) * (torch.rand(n, generator=g) < 0.3)
    relevance[query_ids == 0] = 0  # a query without any relevant row
    expected = _ranking_by_sklearn(scores.numpy(), relevance.numpy(), query_ids.numpy(), k)
    m = ranking_metrics(scores, relevance, query_ids, k)
    assert m == pytest.approx(expected)
    perm = torch.randperm(n, generator=g)
    assert ranking_metrics(scores[perm], relevance[perm], query_ids[perm], k) == pytest.approx(m, abs=1e-12)


def test_ranking_metrics_by_hand():
    # query 1: relevant row ranked 2nd behind a tie-free non-relevant row; query 2: no relevant row
    scores = torch.tensor([0.9, 0.5, 0.1, 0.3, 0.2])
    relevance = torch.tensor([0, 1, 0, 0, 0])
    query_ids = torch.tensor([1, 1, 1, 2, 2])
    m = ranking_metrics(scores, relevance, query_ids, k=3)
    assert m["val_mrr"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["val_map"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["val_ndcg@3"] == pytest.approx((1 / np.log2(3) + 0) / 2)
    # a constant scorer earns no MRR credit from row order
    flat = ranking_metrics(torch.zeros(3), torch.tensor([1, 0, 0]), torch.zeros(3, dtype=torch.long))
    assert flat["val_mrr"] == pytest.approx(1 / 3)
