"""One learning task: a dataset's facts and how to read it and build its model.

Everything that used to be spread over per-dataset dicts and if-chains (config
rules, loaders, normalisation, model choice, export labels) reads a :class:`Task`
from :mod:`common.tasks.registry`, so adding a dataset is one module and one
registration. A task module is imported when its task is asked for (a config
check), so it must stay cheap: numpy at most, never torch or scikit-learn at import
(a ClientApp is a fresh process per message). Models are named by
:class:`ModelRef` and imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

# Checked raw pixels ``(N, H, W)`` on the task's own scale, and int64 labels.
RawPart = tuple["np.ndarray", "np.ndarray"]
# ``(task, data_dir, seed, part)`` -> the ``"train"`` or ``"test"`` part, checked.
RawReader = Callable[["Task", str, int, str], RawPart]
# ``(task, data_dir)`` -> the files the training part is read from.
SourceLister = Callable[["Task", str], tuple[Path, ...]]
# ``(num_classes, features)`` -> a fresh, DP-compatible model.
ModelBuilder = Callable[[int, str], "nn.Module"]

PARTS = ("train", "test")
SCATTERING_SIDE = 28  # the ScatterNet front (common/data/features.py) takes 28x28


@dataclass(frozen=True)
class ModelRef:
    """A model builder named ``"module:function"``, imported on its first call.

    Lets a task name its model without importing torch when it is only listed or
    validated; a task may also hold any plain :data:`ModelBuilder` instead.
    """

    target: str

    def __post_init__(self) -> None:
        module, _, function = self.target.partition(":")
        if not module or not function:
            raise ValueError(f"a model reference is 'module:function', got {self.target!r}")

    def __call__(self, num_classes: int, features: str) -> nn.Module:
        """The referenced builder's model for ``num_classes`` and ``features``."""
        module, _, function = self.target.partition(":")
        builder: ModelBuilder = getattr(importlib.import_module(module), function)
        return builder(num_classes, features)


@dataclass(frozen=True)
class Task:
    """A dataset of square grey images and its model, checked once at registration.

    The normalisation constants are fixed public values (published training-set
    means/stds), never statistics of the private data, so they cost no privacy.
    """

    name: str  # the run-config value of 'dataset'
    num_classes: int  # labels are 0..num_classes-1
    class_labels: tuple[str, ...]  # one per class, in label order (model.json)
    image_side: int  # images are (1, side, side)
    pixel_scale: float  # raw pixels lie in 0..pixel_scale (16 for digits, 255 for IDX)
    mean: float  # x -> (x / pixel_scale - mean) / std
    std: float
    model: ModelBuilder
    read_raw: RawReader
    list_sources: SourceLister
    features: tuple[str, ...] = ("pixels",)  # the feature maps its images suit
    missing_data_hint: str = ""  # how to get the files when none are found
    default_data_dir: Path | None = None  # where a system package puts them, if any

    def __post_init__(self) -> None:
        from common.config import FEATURE_MAPS  # imported late: config reads tasks

        problems = {
            "name": not self.name or self.name != self.name.strip(),
            "num_classes": self.num_classes < 2,
            "class_labels": len(self.class_labels) != self.num_classes,
            "image_side": self.image_side < 1,
            "pixel_scale": not self.pixel_scale > 0,
            "std": not self.std > 0,
            "features": "pixels" not in self.features
            or not set(self.features) <= set(FEATURE_MAPS)
            or ("scattering" in self.features and self.image_side != SCATTERING_SIDE),
        }
        bad = [field for field, wrong in problems.items() if wrong]
        if bad:
            raise ValueError(f"task {self.name!r}: invalid {', '.join(bad)}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one normalised example: ``(1, side, side)``."""
        return (1, self.image_side, self.image_side)

    def normalisation(self) -> tuple[float, float, float]:
        """``(pixel scale, mean, std)``: x -> (x / scale - mean) / std."""
        return self.pixel_scale, self.mean, self.std

    def raw(self, part: str, data_dir: str, seed: int) -> RawPart:
        """The checked raw ``train`` or ``test`` part (``seed`` fixes any split)."""
        if part not in PARTS:
            raise ValueError(f"a dataset part is one of {PARTS}, got {part!r}")
        return self.read_raw(self, data_dir, seed, part)

    def training_sources(self, data_dir: str) -> tuple[Path, ...]:
        """The files the training part is read from; fails clearly when missing."""
        return self.list_sources(self, data_dir)
