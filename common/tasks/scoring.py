"""A task's metrics: the one place that maps its metrics family to an evaluator.

Central evaluation (server), local evaluation (client), the audit and the export
score a model through :func:`evaluate_task`, so a binary task reports AUROC,
AUPRC and the Brier score everywhere and a multiclass task reports accuracy and
macro precision/recall/F1 everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.tasks.registry import get_task
from common.tasks.task import Task

if TYPE_CHECKING:
    import torch
    from torch import nn


def evaluate_task(
    task: str | Task,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Loss (the task's own, if it has one) and the task's metrics of ``model``."""
    task = get_task(task)
    scores = _family_scores(task, model, x, y, batch_size)
    if task.loss is not None:  # the metrics' loss is cross-entropy: report the task's
        scores["loss"] = _task_loss(task, model, x, y, batch_size)
    return scores


def _task_loss(
    task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> float:
    import torch

    loss = task.loss_function()
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            chunk = slice(start, start + batch_size)
            total += float(loss(model(x[chunk]), y[chunk], reduction="sum"))
    return total / len(x)


def _family_scores(
    task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> dict[str, float]:
    from common.tasks import metrics

    if task.metrics == "binary":
        binary = getattr(metrics, "evaluate_binary_model", None)
        if binary is None:  # imported lazily: common/tasks/metrics.py may predate it
            raise RuntimeError(
                f"task {task.name!r} reports binary metrics, which this install's "
                "common/tasks/metrics.py lacks (evaluate_binary_model)"
            )
        return binary(model, x, y, batch_size=batch_size)
    return metrics.evaluate_model(model, x, y, task.num_classes, batch_size=batch_size)
