"""Classification metrics shared by central and client-side evaluation."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Loss, accuracy and macro precision/recall/F1 of ``model`` on ``(x, y)``."""
    # Imported here: scikit-learn's metrics (and the pandas they pull in) cost a
    # ClientApp process 0.7 CPU-s, and most messages never evaluate.
    from sklearn.metrics import precision_recall_fscore_support

    if len(x) == 0:
        raise ValueError("cannot evaluate on an empty set")
    model.eval()
    total_loss = 0.0
    predictions = []
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        total_loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        predictions.append(logits.argmax(dim=1))
    predicted = torch.cat(predictions).numpy()
    truth = y.numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth,
        predicted,
        labels=np.arange(num_classes),
        average="macro",
        zero_division=0,
    )
    return {
        "loss": total_loss / len(x),
        "accuracy": float((predicted == truth).mean()),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }


ECE_BINS = 10  # equal-width probability bins of the expected calibration error


def _expected_calibration_error(truth: np.ndarray, score: np.ndarray) -> float:
    """Σ_b (n_b/N)·|mean label − mean score| over ``ECE_BINS`` equal-width bins."""
    bins = np.minimum((score * ECE_BINS).astype(np.int64), ECE_BINS - 1)
    total = 0.0
    for b in np.unique(bins):
        inside = bins == b
        total += inside.mean() * abs(truth[inside].mean() - score[inside].mean())
    return float(total)


@torch.no_grad()
def evaluate_binary_model(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> dict[str, float]:
    """:func:`evaluate_model`'s keys for a binary task, plus ranking and calibration.

    The model gives two logits per record (or one, read as the logit of label 1);
    the score is the probability of label 1 (the positive class). ``accuracy`` and
    ``precision``/``recall``/``f1`` are at threshold 0.5 and, unlike the macro averages
    of :func:`evaluate_model`, of the positive class: what a credit or clinical user
    asks. ``auroc`` and ``auprc`` (average precision) rank by the score; ``brier``
    (mean squared error of the score) and ``ece`` (expected calibration error, 10
    equal-width bins) measure calibration. With one class in ``y`` the ranking
    metrics are undefined and are NaN (the keys stay, so result columns are stable).
    """
    from sklearn.metrics import (
        average_precision_score,
        brier_score_loss,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    if len(x) == 0:
        raise ValueError("cannot evaluate on an empty set")
    model.eval()
    total_loss = 0.0
    scores = []
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        if logits.shape[1] == 1:
            total_loss += nn.functional.binary_cross_entropy_with_logits(
                logits[:, 0], target.float(), reduction="sum"
            ).item()
            scores.append(torch.sigmoid(logits[:, 0]))
        else:
            total_loss += nn.functional.cross_entropy(
                logits, target, reduction="sum"
            ).item()
            scores.append(torch.softmax(logits, dim=1)[:, 1])
    score = torch.cat(scores).double().numpy()
    truth = y.numpy()
    predicted = (score >= 0.5).astype(truth.dtype)
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, predicted, labels=[1], average="binary", pos_label=1, zero_division=0
    )
    both_classes = len(np.unique(truth)) == 2
    return {
        "loss": total_loss / len(x),
        "accuracy": float((predicted == truth).mean()),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "auroc": float(roc_auc_score(truth, score)) if both_classes else float("nan"),
        "auprc": float(average_precision_score(truth, score))
        if both_classes
        else float("nan"),
        "brier": float(brier_score_loss(truth, score, labels=[0, 1])),
        "ece": _expected_calibration_error(truth.astype(np.float64), score),
    }
