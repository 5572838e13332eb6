"""An edge device's own labelled data: ``.npz``, ``.csv`` or an IDX directory.

Images are raw pixels in the run dataset's native range (its task's pixel scale:
0..16 for digits, 0..255 for the 28x28 sets), shaped ``(N, H, W)``, ``(N, 1, H, W)``
or ``(N, H*W)``; labels are integers ``0..num_classes-1``. They are normalised
exactly like the server's data.

A text task's ``.csv`` is texts and labels laid out as the task's own CSV
(:mod:`common.tasks.text_device`), tokenised with the task's tokenizer.
"""

from __future__ import annotations

import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from common.data.checks import DataFileError, reader_said
from common.data.datasets import checked_raw, normalise_images
from common.data.idx import IDX_FILES, read_idx_pair
from common.tasks.registry import get_task
from common.tasks.text_device import (
    local_text_rule,
    local_text_sources,
    read_local_texts,
    text_reader,
)

LABEL_COLUMN = "label"
CSV_FIRST_RECORD_LINE = 2  # line 1 is the header
_NPZ_RULE = "an .npz archive holding numeric arrays 'x' (images) and 'y' (labels)"
_CSV_RULE = (
    f"a CSV whose first line names the columns (one is '{LABEL_COLUMN}'), then one "
    "row of numbers per example, as wide as the header"
)
_PATH_RULE = (
    "node config key 'data-path' names an existing .npz file, .csv file or IDX directory"
)
# What numpy and zipfile raise for an empty, corrupt or truncated archive or table.
_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise DataFileError(path, "is a single .npy array, not an .npz", _NPZ_RULE)
        with data:
            missing = [key for key in ("x", "y") if key not in data]
            if missing:
                raise DataFileError(path, f"lacks array {missing[0]!r}", _NPZ_RULE)
            return data["x"], data["y"]
    except _READ_ERRORS as exc:
        raise DataFileError(
            path, "cannot be read as an .npz (empty, corrupt or truncated)", _NPZ_RULE,
            reader_said(exc),
        ) from exc  # fmt: skip


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, encoding="utf-8-sig") as fh:
            header = [name.strip() for name in fh.readline().split(",")]
        with warnings.catch_warnings():  # a header-only file is refused below
            warnings.simplefilter("ignore", UserWarning)
            table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, encoding="utf-8")
    except _READ_ERRORS as exc:  # numpy names the row of a non-number or short row
        raise DataFileError(
            path, "cannot be read as a table of numbers", _CSV_RULE,
            reader_said(exc),
        ) from exc  # fmt: skip
    if LABEL_COLUMN not in header:
        raise DataFileError(path, f"the header has no '{LABEL_COLUMN}' column", _CSV_RULE)
    if table.size == 0:
        raise DataFileError(path, "holds no examples", _CSV_RULE)
    if table.shape[1] != len(header):
        raise DataFileError(
            path, "rows are not as wide as the header", _CSV_RULE,
            f"{len(header)} names in the header, {table.shape[1]} values per row",
        )  # fmt: skip
    col = header.index(LABEL_COLUMN)
    return np.delete(table, col, axis=1), table[:, col]


_TRAIN_IDX = (IDX_FILES["x_train"], IDX_FILES["y_train"])


def local_sources(path_text: str, task: str | None = None) -> tuple[Path, ...]:
    """The files :func:`load_local_arrays` reads for ``data-path``: one ``.npz`` or
    ``.csv``, or an IDX folder's two training files (a text task's ``.csv``: with the
    tokenizer's files, which shape its token ids). A path that is none of these
    fails here, with the error the loader gives."""
    path = Path(path_text).expanduser()
    reader = text_reader(get_task(task)) if task is not None else None
    if reader is not None and path.suffix == ".csv":
        if not path.is_file():
            raise DataFileError(path, "does not exist", local_text_rule(reader))
        return local_text_sources(reader, path)
    if path.is_dir():
        files = tuple(path / name for name in _TRAIN_IDX)
        for f in files:
            if not f.is_file():
                raise DataFileError(
                    f, "is missing from the data-path directory", _PATH_RULE
                )
        return files
    if path.suffix in (".npz", ".csv") and path.is_file():
        return (path,)
    raise DataFileError(
        path, "does not exist or is not an .npz, a .csv or a folder", _PATH_RULE
    )


def load_local_arrays(path_text: str, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Model input (the task's preprocessing applied; images: ``(N, 1, H, W)``) and
    int64 labels from a local data path of run task ``task``.

    Every value is checked first (:mod:`common.data.checks`); a failure is a
    :class:`~common.data.checks.DataFileError` naming the file and the record.
    """
    files = local_sources(path_text, task)
    path = files[0]
    reader = text_reader(get_task(task))
    if reader is not None and path.suffix == ".csv":  # texts: tokenised, then float ids
        ids, labels = read_local_texts(reader, path)
        return normalise_images(task, ids), labels
    if len(files) == 2:  # an IDX folder
        x, y = read_idx_pair(task, *files)
        path = files[0].parent
    elif path.suffix == ".npz":
        x, y = checked_raw(task, *_read_npz(path), path)
    else:
        x, y = checked_raw(task, *_read_csv(path), path, first_line=CSV_FIRST_RECORD_LINE)
    if len(x) == 0:
        raise DataFileError(path, "holds no examples", _PATH_RULE)
    return normalise_images(task, x), y
