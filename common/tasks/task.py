"""One learning task: its data, its model, its loss and metrics, in one object.

Everything that differs between learning problems (how the records are read and
checked, how raw records become model input, the model, the loss, the metrics,
the labels and shapes written for export, which DP gradient paths the model
allows) is a field of :class:`Task`. The rest of privfed (every privacy mode,
validation, resume, compression, export) reads only these fields, so a task
written outside the package (run key ``task = "package.module:attribute"``, see
docs/tasks.md) goes through exactly the code the built-ins use.

A task module is imported when its task is asked for (a config check), so it must
stay cheap: numpy at most, never torch or scikit-learn at import (a ClientApp is
a fresh process per message). Models are named by :class:`ModelRef` and imported
on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.tasks.preprocessing import (
    PREPROCESSING_KINDS,
    AffinePreprocessing,
    CallablePreprocessing,
    ImagePreprocessing,
    Preprocessing,
)

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

# Raw training or test records and their int64 labels, checked; a training part
# may add a third array: each record's natural site (a hospital, a bank branch).
RawPart = tuple["np.ndarray", "np.ndarray"]
RawRead = RawPart | tuple["np.ndarray", "np.ndarray", "np.ndarray | None"]
# ``(task, data_dir, seed, part)`` -> the ``"train"`` or ``"test"`` part.
RawReader = Callable[["Task", str, int, str], RawRead]
# ``(task, data_dir)`` -> the files the training part is read from (cache keys).
SourceLister = Callable[["Task", str], tuple[Path, ...]]
# ``(num_classes, features)`` -> a fresh, DP-compatible model.
ModelBuilder = Callable[[int, str], "nn.Module"]
# ``(logits, targets, reduction)`` -> the loss, like ``F.cross_entropy``; it must be
# a sum (or mean) of independent per-example terms, as per-sample clipping needs.
LossFunction = Callable[..., "torch.Tensor"]

PARTS = ("train", "test")
SCATTERING_SIDE = 28  # the ScatterNet front (common/data/features.py) takes 28x28
METRICS = ("multiclass", "binary")  # what common.tasks.scoring can report
REQUIRED_PARTS = ("name", "class_labels", "model", "read_raw", "preprocessing")

__all__ = [
    "AffinePreprocessing",
    "CallablePreprocessing",
    "ImagePreprocessing",
    "ModelRef",
    "Task",
]


@dataclass(frozen=True)
class ModelRef:
    """A callable named ``"module:function"``, imported on its first call.

    Lets a task name its model (or loss) without importing torch when it is only
    listed or validated; a task may also hold any plain callable instead.
    """

    target: str

    def __post_init__(self) -> None:
        module, _, function = self.target.partition(":")
        if not module or not function:
            raise ValueError(f"a model reference is 'module:function', got {self.target!r}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The referenced function's result for these arguments."""
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)(*args, **kwargs)


def _no_sources(task: Task, data_dir: str) -> tuple[Path, ...]:
    """No files to hash: the reader's module source keys a cached shard instead."""
    return ()


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean"):
    import torch.nn.functional as F

    return F.cross_entropy(logits, target, reduction=reduction)


@dataclass(frozen=True)
class Task:
    """A learning task, checked once on creation (a bad part fails by name).

    Parameters
    ----------
    name
        Shown in results and logs; a built-in's is its ``task`` run-key value.
    class_labels
        One name per class, in label order (labels are ``0..len-1``; ``model.json``).
    model
        ``(num_classes, features) -> nn.Module``: a fresh model for the input shape.
    read_raw
        ``(task, data_dir, seed, part) -> (x, y)`` or ``(x, y, sites)`` for part
        ``"train"`` or ``"test"``: raw records ``(N, *raw_shape)`` and integer
        labels; ``sites`` (training part, when ``natural_sites``) gives each record's
        institution. :meth:`raw` checks whatever the reader returns.
    preprocessing
        Raw records to model input with public constants only (see
        :mod:`common.tasks.preprocessing`); also written to ``model.json``.
    list_sources
        The files the training part is read from, hashed into a cached shard's key.
    loss
        ``(logits, y, reduction=...)``; ``None``: cross-entropy.
    metrics
        ``"multiclass"`` (accuracy, macro P/R/F1) or ``"binary"`` (those plus
        AUROC, AUPRC and the Brier score; needs two classes).
    grad_sample_modes
        The DP-SGD gradient paths its model allows (``direct`` handles Conv2d and
        Linear layers only); a run asking for another is refused up front.
    features
        Fixed feature maps its records suit (``scattering``: 28x28 images only).
    natural_sites
        The training reader returns a site per record (``partitioner = "sites"``).
    model_keys
        Run keys (``lora-rank``, say) the model builder takes as keyword arguments,
        named with underscores: ``model(num_classes, features, lora_rank=8)``. Every
        process builds the model from the same run config, so its shapes agree.

    A model may send less than its whole state: one whose ``state_dict`` holds only
    its trainable parameters (:class:`common.tasks.exchanged_state.TrainableState`,
    a LoRA text model) rebuilds the frozen rest from local files in every process,
    so the server and the clients exchange, average and store the adapters alone.
    """

    name: str
    class_labels: tuple[str, ...]
    model: ModelBuilder
    read_raw: RawReader
    preprocessing: Preprocessing
    list_sources: SourceLister = _no_sources
    loss: LossFunction | None = None
    metrics: str = "multiclass"
    grad_sample_modes: tuple[str, ...] = ("direct", "hooks", "ew", "functorch", "ghost")
    features: tuple[str, ...] = ("pixels",)
    natural_sites: bool = False
    missing_data_hint: str = ""  # how to get the files when none are found
    default_data_dir: Path | None = None  # where a system package puts them, if any
    model_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Imported late: common.run_keys reads tasks.
        from common.run_keys import FEATURE_MAPS, GRAD_SAMPLE_MODES, RULES

        object.__setattr__(self, "class_labels", tuple(self.class_labels))
        object.__setattr__(self, "grad_sample_modes", tuple(self.grad_sample_modes))
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "model_keys", tuple(self.model_keys))
        image = isinstance(self.preprocessing, ImagePreprocessing)
        problems = {
            "name": not isinstance(self.name, str)
            or not self.name
            or self.name != self.name.strip(),
            "class_labels": len(self.class_labels) < 2
            or not all(isinstance(label, str) for label in self.class_labels),
            "model": not callable(self.model),
            "read_raw": not callable(self.read_raw),
            "preprocessing": not isinstance(self.preprocessing, PREPROCESSING_KINDS),
            "list_sources": not callable(self.list_sources),
            "loss": self.loss is not None and not callable(self.loss),
            "metrics": self.metrics not in METRICS
            or (self.metrics == "binary" and len(self.class_labels) != 2),
            "grad_sample_modes": not self.grad_sample_modes
            or not set(self.grad_sample_modes) <= set(GRAD_SAMPLE_MODES),
            "features": "pixels" not in self.features
            or not set(self.features) <= set(FEATURE_MAPS)
            or (
                "scattering" in self.features
                and not (image and self.preprocessing.side == SCATTERING_SIDE)
            ),
            "model_keys": not set(self.model_keys) <= set(RULES),
        }
        bad = [field for field, wrong in problems.items() if wrong]
        if bad:
            raise ValueError(
                f"task {self.name!r}: invalid {', '.join(bad)} (common/tasks/task.py "
                "says what each part must be; docs/tasks.md)"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes: labels are ``0..num_classes-1``."""
        return len(self.class_labels)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one preprocessed example (the model's input), e.g. ``(1, 28, 28)``."""
        return tuple(self.preprocessing.input_shape)

    @property
    def is_image(self) -> bool:
        """True for square grey images (the only records feature maps apply to)."""
        return isinstance(self.preprocessing, ImagePreprocessing)

    def loss_function(self) -> LossFunction:
        """The training loss, ``(logits, y, reduction=...)``; cross-entropy by default."""
        return self.loss if self.loss is not None else _cross_entropy

    def preprocess(self, x: np.ndarray) -> np.ndarray:
        """Raw records to float32 model input ``(N, *input_shape)``."""
        return self.preprocessing(x)

    def _read(self, part: str, data_dir: str, seed: int) -> RawRead:
        if part not in PARTS:
            raise ValueError(f"a dataset part is one of {PARTS}, got {part!r}")
        got = self.read_raw(self, data_dir, seed, part)
        if not isinstance(got, tuple) or len(got) not in (2, 3):
            raise TypeError(
                f"task {self.name!r}: read_raw must return (x, y) or (x, y, sites), "
                f"got {type(got).__name__}"
            )
        return got

    def raw(self, part: str, data_dir: str, seed: int) -> RawPart:
        """The checked raw ``train`` or ``test`` records and int64 labels."""
        return self.raw_with_sites(part, data_dir, seed)[:2]  # type: ignore[return-value]

    def raw_with_sites(
        self, part: str, data_dir: str, seed: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Checked raw records, labels, and each record's site (``None`` if none)."""
        import numpy as np

        from common.data.checks import check_labels

        got = self._read(part, data_dir, seed)
        source = f"task '{self.name}' ({part} part)"
        x = self.preprocessing.check(np.asarray(got[0]), source, self.name)
        y = check_labels(np.asarray(got[1]), len(x), source, num_classes=self.num_classes)
        sites = got[2] if len(got) == 3 else None
        if sites is not None:
            sites = np.asarray(sites)
            if sites.ndim != 1 or len(sites) != len(x) or sites.dtype.kind not in "iuUS":
                raise ValueError(
                    f"task {self.name!r}: sites must be one integer or string per "
                    f"record, got shape {sites.shape}, dtype {sites.dtype}"
                )
        if part == "train" and self.natural_sites and sites is None:
            raise ValueError(
                f"task {self.name!r} declares natural_sites but read_raw returned no "
                "sites for its training part"
            )
        return x, y, sites

    def training_sources(self, data_dir: str) -> tuple[Path, ...]:
        """The files the training part is read from; fails clearly when missing."""
        return tuple(self.list_sources(self, data_dir))

    def export_spec(self) -> dict[str, Any]:
        """What ``model.json`` says about the task: labels, shapes, preprocessing."""
        return {
            "input_shape": list(self.input_shape),
            "classes": list(self.class_labels),
            "metrics": self.metrics,
            "preprocessing": self.preprocessing.describe(),
        }
