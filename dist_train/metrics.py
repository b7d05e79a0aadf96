"""Classification metrics from gathered predictions, each computed once from the confusion matrix."""
from __future__ import annotations

import torch


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted]."""
    flat = targets.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor) -> dict:
    """Accuracy, macro precision/recall/F1, per-class F1, the confusion matrix and the per-sample mean loss.

    Classes absent from both targets and predictions get F1 = 0 and count in the macro average, as in
    scikit-learn's `zero_division=0`. Rows with a negative target (unreadable images skipped under
    data.bad_samples=skip) are left out.
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
    return {
        "val_loss": losses.double().mean().item(),
        "val_accuracy": (tp.sum() / cm.sum()).item(),
        "val_f1_macro": f1.mean().item(),
        "val_precision_macro": precision.mean().item(),
        "val_recall_macro": recall.mean().item(),
        "val_samples": int(cm.sum().item()),
        "per_class_f1": f1.tolist(),
        "confusion_matrix": cm.long().tolist(),
    }


def is_improvement(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best
