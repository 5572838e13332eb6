"""Task 'digits': scikit-learn's 1,797 embedded 8x8 digits and a tanh MLP.

Needs no download: the images ship inside scikit-learn. They are split 80/20,
stratified, by the run seed (the test fifth stays on the server).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from common.data.checks import DatasetError
from common.data.datasets import checked_raw
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


def read_digits(task: Task, data_dir: str, seed: int, part: str) -> RawPart:
    """Raw checked digits (0..16) of ``part`` of the stratified 80/20 split by ``seed``."""
    from sklearn.datasets import load_digits  # heavy: only when the data is read
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images, labels = checked_raw(
        task, bunch.images, bunch.target, "scikit-learn load_digits()"
    )
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=TEST_FRACTION, random_state=seed, stratify=labels
    )
    return (x_tr, y_tr) if part == "train" else (x_te, y_te)


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
