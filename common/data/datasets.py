"""Dataset arrays of any registered task (common/tasks), loaded and normalised.

Each loader returns a :class:`DatasetArrays` with float32 images shaped
``(N, 1, H, W)`` (normalised with the task's fixed constants, never statistics
of the private data) and int64 labels. The test split stays on the server. What
differs between datasets (sizes, scale, files, model) is in the task, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.data.checks import DatasetError, check_images, check_labels
from common.tasks.registry import get_task


@dataclass(frozen=True)
class DatasetArrays:
    """A train/test split held in memory."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise DatasetError(f"{self.name}: images and labels differ in length")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(1, 28, 28)``."""
        return tuple(self.x_train.shape[1:])


def normalisation(name: str) -> tuple[float, float, float]:
    """``(pixel scale, mean, std)``: x -> (x / scale - mean) / std."""
    return get_task(name).normalisation()


def checked_images(
    name: str, images: np.ndarray, source: Path | str, first_line: int | None = None
) -> np.ndarray:
    """Raw ``(N, H, W)`` pixels of dataset ``name``, checked (common.data.checks).

    ``first_line`` is the file line of record 0 (a CSV), so errors can name lines.
    """
    task = get_task(name)
    return check_images(
        images, source, dataset=name, side=task.image_side,
        max_value=task.pixel_scale, first_line=first_line,
    )  # fmt: skip


def checked_labels(
    name: str,
    labels: np.ndarray,
    count: int,
    source: Path | str,
    first_line: int | None = None,
) -> np.ndarray:
    """``count`` int64 labels of dataset ``name``, checked against its classes."""
    num_classes = get_task(name).num_classes
    return check_labels(
        labels, count, source, num_classes=num_classes, first_line=first_line
    )


def checked_raw(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    source: Path | str,
    first_line: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw ``(N, H, W)`` pixels and int64 labels of ``name``, checked, from one file."""
    x = checked_images(name, images, source, first_line)
    return x, checked_labels(name, labels, len(x), source, first_line)


def normalise_images(name: str, images: np.ndarray) -> np.ndarray:
    """Raw ``(N, H, W)`` pixels to normalised float32 ``(N, 1, H, W)``."""
    scale, mean, std = normalisation(name)
    x = images.astype(np.float32) / scale
    return ((x - mean) / std)[:, None, :, :].astype(np.float32)


def load_arrays(name: str, data_dir: str, seed: int) -> DatasetArrays:
    """Read, check and normalise both parts of dataset ``name`` (uncached)."""
    task = get_task(name)
    split = {}
    for part in ("train", "test"):
        x, y = task.raw(part, data_dir, seed)
        split[part] = (normalise_images(name, x), y)
    return DatasetArrays(
        name=name,
        x_train=split["train"][0],
        y_train=split["train"][1],
        x_test=split["test"][0],
        y_test=split["test"][1],
        num_classes=task.num_classes,
    )


def training_sources(name: str, data_dir: str) -> tuple[Path, ...]:
    """The files the training split of ``name`` is read from (what a client uses)."""
    return get_task(name).training_sources(data_dir)


@lru_cache(maxsize=2)
def load_raw_training(name: str, data_dir: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training split's checked raw pixels ``(N, H, W)`` and int64 labels.

    Exactly ``load_dataset(...)``'s ``x_train`` before :func:`normalise_images` (and
    its ``y_train``), without reading or normalising the test split: a client
    normalises only its own shard's rows. Read-only (cached and shared).
    """
    x, y = get_task(name).raw("train", data_dir, seed)
    x, y = np.asarray(x), np.asarray(y)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@lru_cache(maxsize=4)
def load_dataset(name: str, data_dir: str, seed: int) -> DatasetArrays:
    """Load (once per process) the dataset a run config names."""
    return load_arrays(name, data_dir, seed)
