"""The reference every per-sample gradient path is checked against: one backward
pass per example, with plain autograd."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def per_example_grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> list[list[torch.Tensor]]:
    """For each example, the gradient of its cross-entropy loss, parameter by
    parameter (leaves ``p.grad`` cleared)."""
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    return grads
