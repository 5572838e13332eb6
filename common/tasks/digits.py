"""Task 'digits': scikit-learn's 1,797 embedded 8x8 digits and a tanh MLP.

Needs no download: the images ship inside scikit-learn. They are split 80/20,
stratified, by the run seed (the test fifth stays on the server).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from common.data.checks import DatasetError
from common.data.datasets import checked_raw
from common.data.stratified_split import stratified_split
from common.tasks.registry import register_task
from common.tasks.task import ImagePreprocessing, ModelRef, RawPart, Task

TEST_FRACTION = 0.2


def digits_files(task: Task, data_dir: str) -> tuple[Path, ...]:
    """The file ``load_digits()`` reads, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / "datasets" / "data" / "digits.csv.gz" if locations else None
    if path is None or not path.is_file():
        raise DatasetError(
            "dataset 'digits' needs scikit-learn's embedded digits.csv.gz, which the "
            f"installed scikit-learn lacks (looked for {path})"
        )
    return (path,)


def load_digits_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 8, 8, float64) and labels of scikit-learn's digits.csv.gz, read as
    ``sklearn.datasets.load_digits()`` reads it, without importing scikit-learn (1.6 s
    of SciPy; common/data/stratified_split.py)."""
    with gzip.open(path, mode="rt", encoding="utf-8") as fh:
        table = np.loadtxt(fh, delimiter=",")
    if table.ndim != 2 or table.shape[1] != 65:
        raise DatasetError(
            f"{path}: expected 65 comma-separated columns (64 pixels and the label), "
            f"got an array of shape {table.shape}"
        )
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def read_digits(task: Task, data_dir: str, seed: int, part: str) -> RawPart:
    """Raw checked digits (0..16) of ``part`` of the stratified 80/20 split by
    ``seed`` (the split ``sklearn.model_selection.train_test_split`` draws)."""
    (path,) = digits_files(task, data_dir)
    images, labels = load_digits_file(path)
    images, labels = checked_raw(task, images, labels, f"scikit-learn's {path.name}")
    train, test = stratified_split(labels, TEST_FRACTION, seed)
    chosen = train if part == "train" else test
    return images[chosen], labels[chosen]


DIGITS = register_task(
    Task(
        name="digits",
        class_labels=tuple(str(i) for i in range(10)),
        preprocessing=ImagePreprocessing(side=8, pixel_scale=16.0, mean=0.3, std=0.4),
        model=ModelRef("common.tasks.models:tanh_mlp"),
        read_raw=read_digits,
        list_sources=digits_files,
    )
)
