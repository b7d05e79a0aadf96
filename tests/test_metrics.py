"""Metrics agree with scikit-learn, including classes absent from a split."""
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

from dist_train.metrics import classification_metrics, is_improvement


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


def test_is_improvement():
    assert is_improvement(0.5, None, "max")
    assert is_improvement(0.6, 0.5, "max") and not is_improvement(0.5, 0.5, "max")
    assert is_improvement(0.4, 0.5, "min") and not is_improvement(0.6, 0.5, "min")
