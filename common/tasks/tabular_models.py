"""DP-compatible models for encoded tabular records ``(N, F)``: nn.Linear and tanh only.

Only ``nn.Linear`` layers train, so every grad-sample mode works, the project's
``direct`` per-sample clipping among them (client/training/per_sample_grads.py takes
Linear on ``(B, in)`` inputs without forming per-sample gradients). No BatchNorm (it
mixes records, which DP-SGD's per-sample bound forbids), no integer buffers, no
scalar parameters (Flower's DP wrappers mishandle both). Both give one logit per
class, so the project's cross-entropy training and :func:`evaluate_binary_model`
(common/tasks/metrics.py) apply unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# ``(num_features, num_classes)`` -> a fresh model.
TabularBuilder = Callable[[int, int], nn.Module]
MLP_HIDDEN = 32


class LogisticRegression(nn.Module):
    """Multinomial logistic regression, zero-initialised (convex: no seed to tune)."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_features, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for records ``(B, num_features)``."""
        return self.linear(x)


class TabularMLP(nn.Module):
    """One tanh hidden layer (bounded activations suit DP-SGD's clipping)."""

    def __init__(self, num_features: int, num_classes: int, hidden: int = MLP_HIDDEN):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for records ``(B, num_features)``."""
        return self.net(x)


def _check(num_features: int, num_classes: int) -> None:
    if num_features < 1 or num_classes < 2:
        raise ValueError(
            f"a tabular model needs >= 1 feature and >= 2 classes, got {num_features} "
            f"features and {num_classes} classes"
        )


def logistic_regression(num_features: int, num_classes: int) -> nn.Module:
    """Builder: :class:`LogisticRegression` (F·C + C parameters)."""
    _check(num_features, num_classes)
    return LogisticRegression(num_features, num_classes)


def tabular_mlp(num_features: int, num_classes: int) -> nn.Module:
    """Builder: :class:`TabularMLP` with :data:`MLP_HIDDEN` tanh units."""
    _check(num_features, num_classes)
    return TabularMLP(num_features, num_classes)


MODELS: dict[str, TabularBuilder] = {
    "logistic": logistic_regression,
    "mlp": tabular_mlp,
}
