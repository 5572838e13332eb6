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
