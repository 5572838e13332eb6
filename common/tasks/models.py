"""DP-compatible models: no BatchNorm, no integer buffers, no scalar parameters."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from common.config import RunConfig
from common.data.features import SCATTERING_SHAPE
from common.tasks.registry import get_task
from common.tasks.task import Task


class TanhCNN28(nn.Module):
    """The 26,010-parameter tanh CNN for 28x28 inputs (Papernot et al. 2021)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=8, stride=2, padding=2),
            nn.Tanh(),
            nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, kernel_size=4, stride=2),
            nn.Tanh(),
            nn.MaxPool2d(2, 1),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 32),
            nn.Tanh(),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch shaped ``(B, 1, 28, 28)``."""
        return self.classifier(self.features(x))


class DigitsMLP(nn.Module):
    """A small tanh MLP for 8x8 digits (4,810 parameters)."""

    def __init__(self, num_classes: int = 10, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.Tanh(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch shaped ``(B, 1, 8, 8)``."""
        return self.net(x)


class FeatureLinear(nn.Module):
    """A linear classifier on fixed features, e.g. ScatterNet (81x7x7 -> 39,700 params)."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int = 10) -> None:
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of feature maps shaped ``(B, *in_shape)``."""
        return self.classifier(x)


def tanh_mlp(num_classes: int, features: str) -> nn.Module:
    """Builder of the 8x8 digits task (pixels only)."""
    return DigitsMLP(num_classes)


def tanh_cnn_28(num_classes: int, features: str) -> nn.Module:
    """Builder of the 28x28 tasks: the tanh CNN, or a linear head on ScatterNet."""
    if features == "scattering":
        return FeatureLinear(SCATTERING_SHAPE, num_classes)
    return TanhCNN28(num_classes)


def build_model(
    task: str | Task,
    num_classes: int | None = None,
    seed: int | None = None,
    features: str = "pixels",
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The model of ``task`` (a Task or a ``task`` run-key value) for input
    ``features``, seeded when ``seed`` is given. ``num_classes`` defaults to the task's.
    ``options``: the run keys in the task's ``model_keys`` (their defaults if absent).
    """
    task = get_task(task)
    kwargs = model_options(task, options)
    if features not in task.features:
        raise ValueError(
            f"run config keys 'features' and 'task': task {task.name!r} takes "
            f"features {', '.join(map(repr, task.features))}, got {features!r}"
        )
    if seed is not None:
        torch.manual_seed(seed)
    return task.model(
        task.num_classes if num_classes is None else num_classes, features, **kwargs
    )


def model_options(
    task: str | Task, run_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The keyword arguments of ``task``'s model builder: its ``model_keys`` from
    ``run_config`` (run keys with dashes), else their defaults."""
    task = get_task(task)
    if not task.model_keys:
        return {}
    defaults = RunConfig().to_run_config()
    given = run_config or {}
    return {key.replace("-", "_"): given.get(key, defaults[key]) for key in task.model_keys}


def build_run_model(
    cfg: RunConfig, num_classes: int | None = None, seed: int | None = None
) -> nn.Module:
    """The model of run ``cfg``: its task, features and model keys (``lora-rank``...)."""
    return build_model(cfg.task, num_classes, seed, cfg.features, cfg.to_run_config())


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_dimension(cfg: RunConfig) -> int:
    """Trainable parameters of the run's model."""
    return count_parameters(build_run_model(cfg))
