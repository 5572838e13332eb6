"""Dataset arrays of any task (common/tasks), loaded, checked and preprocessed.

Each loader returns a :class:`DatasetArrays` with float32 model input shaped
``(N, *task.input_shape)`` (preprocessed with the task's public constants, never
statistics of the private data) and int64 labels. The test split stays on the
server. What differs between tasks (sizes, scale, files, model) is in the task,
not here; every function takes a task or a ``task`` run-key value.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.data.checks import DatasetError, check_images, check_labels
from common.tasks.registry import get_task
from common.tasks.task import ImagePreprocessing, Task


@dataclass(frozen=True)
class DatasetArrays:
    """A train/test split held in memory."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    sites_train: np.ndarray | None = None  # each training record's site, if the task has

    def __post_init__(self) -> None:
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise DatasetError(f"{self.name}: images and labels differ in length")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(1, 28, 28)``."""
        return tuple(self.x_train.shape[1:])


def normalisation(name: str | Task) -> tuple[float, float, float]:
    """``(pixel scale, mean, std)`` of an image task: x -> (x / scale - mean) / std."""
    prep = get_task(name).preprocessing
    if not isinstance(prep, ImagePreprocessing):
        raise ValueError(f"task {get_task(name).name!r} is not an image task")
    return prep.pixel_scale, prep.mean, prep.std


def checked_images(
    name: str | Task,
    images: np.ndarray,
    source: Path | str,
    first_line: int | None = None,
) -> np.ndarray:
    """Raw records of task ``name``, checked as its preprocessing requires
    (image tasks: ``(N, H, W)`` pixels, common.data.checks).

    ``first_line`` is the file line of record 0 (a CSV), so errors can name lines.
    """
    task = get_task(name)
    prep = task.preprocessing
    if isinstance(prep, ImagePreprocessing):
        return check_images(
            images, source, dataset=task.name, side=prep.side,
            max_value=prep.pixel_scale, first_line=first_line,
        )  # fmt: skip
    return prep.check(images, source, task.name, first_line)


def checked_labels(
    name: str | Task,
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
    name: str | Task,
    images: np.ndarray,
    labels: np.ndarray,
    source: Path | str,
    first_line: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw ``(N, H, W)`` pixels and int64 labels of ``name``, checked, from one file."""
    x = checked_images(name, images, source, first_line)
    return x, checked_labels(name, labels, len(x), source, first_line)


def normalise_images(name: str | Task, images: np.ndarray) -> np.ndarray:
    """Raw records to float32 model input by the task's preprocessing (images:
    ``(N, H, W)`` pixels to normalised ``(N, 1, H, W)``)."""
    return get_task(name).preprocess(images)


def load_arrays(name: str | Task, data_dir: str, seed: int) -> DatasetArrays:
    """Read, check and preprocess both parts of task ``name`` (uncached)."""
    task = get_task(name)
    split = {}
    x, y, sites = task.raw_with_sites("train", data_dir, seed)
    split["train"] = (task.preprocess(x), y)
    x, y = task.raw("test", data_dir, seed)
    split["test"] = (task.preprocess(x), y)
    return DatasetArrays(
        name=task.name,
        x_train=split["train"][0],
        y_train=split["train"][1],
        x_test=split["test"][0],
        y_test=split["test"][1],
        num_classes=task.num_classes,
        sites_train=sites,
    )


def training_sources(name: str | Task, data_dir: str) -> tuple[Path, ...]:
    """The files the training split of ``name`` is read from (what a client uses)."""
    return get_task(name).training_sources(data_dir)


@lru_cache(maxsize=2)
def load_raw_training(name: str, data_dir: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training split's checked raw records and int64 labels.

    Exactly ``load_dataset(...)``'s ``x_train`` before preprocessing (and its
    ``y_train``), without reading or preprocessing the test split: a client
    preprocesses only its own shard's rows. Read-only (cached and shared).
    """
    x, y, _ = load_raw_training_sites(name, data_dir, seed)
    return x, y


@lru_cache(maxsize=2)
def load_raw_training_sites(
    name: str, data_dir: str, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`load_raw_training` plus each record's natural site (``None``: none)."""
    x, y, sites = get_task(name).raw_with_sites("train", data_dir, seed)
    x, y = np.asarray(x), np.asarray(y)
    for array in (x, y, sites):
        if array is not None:
            array.setflags(write=False)
    return x, y, sites


@lru_cache(maxsize=2)
def load_test_split(name: str, data_dir: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The test split, preprocessed, and its int64 labels (what the server scores on):
    ``load_dataset(...)``'s ``x_test``/``y_test`` without reading the training split
    (60,000 images to decode and normalise for Fashion-MNIST)."""
    task = get_task(name)
    x, y = task.raw("test", data_dir, seed)
    return task.preprocess(x), y


@lru_cache(maxsize=4)
def load_dataset(name: str, data_dir: str, seed: int) -> DatasetArrays:
    """Load (once per process) the dataset a run config names."""
    return load_arrays(name, data_dir, seed)
