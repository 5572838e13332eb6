"""IDX files (the (Fashion-)MNIST format): reading, checking, finding the folder.

Shared by every task stored as the four IDX ``.gz`` files of LeCun's MNIST layout:
:func:`idx_task` makes such a task (28x28 images, pixels 0..255, the tanh CNN or a
ScatterNet front), so a new one states only its labels, constants and where to
find the files (see common/tasks/mnist.py).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from common.data.checks import DataFileError, DatasetError, reader_said
from common.data.datasets import checked_images, checked_labels
from common.tasks.registry import get_task
from common.tasks.task import ImagePreprocessing, ModelRef, RawPart, Task

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
_IDX_RULE = "an IDX file (optionally gzipped) of unsigned bytes, as its header says"


def read_idx(path: Path) -> np.ndarray:
    """Read one (optionally gzipped) IDX file into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataFileError(
            path, "cannot read IDX file: corrupt or truncated", _IDX_RULE,
            reader_said(exc),
        ) from exc  # fmt: skip
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataFileError(path, "is not an unsigned-byte IDX file", _IDX_RULE)
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFileError(path, "truncated inside its IDX header", _IDX_RULE)
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DataFileError(
            path, "its size does not match its IDX header", _IDX_RULE,
            f"header says {expected} values, file holds {len(data) - header}",
        )  # fmt: skip
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_pair(task: Task | str, images: Path, labels: Path) -> RawPart:
    """Raw images and labels of ``task`` from two IDX files, each checked and named."""
    x = checked_images(task, read_idx(images), images)
    return x, checked_labels(task, read_idx(labels), len(x), labels)


def resolve_idx_dir(task: Task | str, data_dir: str) -> Path:
    """The directory holding the IDX files of ``task``; fail clearly if missing."""
    task = get_task(task)
    name = task.name
    if data_dir:
        directory = Path(data_dir).expanduser()
    elif task.default_data_dir is not None and task.default_data_dir.is_dir():
        directory = task.default_data_dir
    else:
        hint = task.missing_data_hint or "set 'data-dir' to their directory"
        raise DatasetError(f"dataset '{name}' needs its IDX files: {hint}")
    missing = [f for f in IDX_FILES.values() if not (directory / f).is_file()]
    if missing:
        raise DatasetError(
            f"run config key 'data-dir': {directory} lacks {', '.join(missing)} "
            f"(dataset '{name}' needs {', '.join(IDX_FILES.values())})"
        )
    return directory


def read_idx_part(task: Task, data_dir: str, seed: int, part: str) -> RawPart:
    """A task's reader: the checked ``train`` or ``test`` IDX pair (``seed`` unused)."""
    directory = resolve_idx_dir(task, data_dir)
    return read_idx_pair(
        task, directory / IDX_FILES[f"x_{part}"], directory / IDX_FILES[f"y_{part}"]
    )


def idx_training_files(task: Task, data_dir: str) -> tuple[Path, ...]:
    """A task's source lister: the training images and labels IDX files."""
    directory = resolve_idx_dir(task, data_dir)
    return (directory / IDX_FILES["x_train"], directory / IDX_FILES["y_train"])


def idx_task(
    name: str,
    class_labels: tuple[str, ...],
    mean: float,
    std: float,
    missing_data_hint: str,
    default_data_dir: Path | None = None,
) -> Task:
    """A task of 28x28 grey images in 0..255 stored as IDX files, with the tanh CNN."""
    return Task(
        name=name,
        class_labels=class_labels,
        preprocessing=ImagePreprocessing(side=28, pixel_scale=255.0, mean=mean, std=std),
        model=ModelRef("common.tasks.models:tanh_cnn_28"),
        read_raw=read_idx_part,
        list_sources=idx_training_files,
        features=("pixels", "scattering"),
        missing_data_hint=missing_data_hint,
        default_data_dir=default_data_dir,
    )
