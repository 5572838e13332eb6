"""What a data source must hold before anyone trains on it, checked at load.

Every source (the embedded digits, IDX files, a node's own ``.npz`` / ``.csv``) goes
through the same checks: pixels are real, finite numbers on the dataset's raw scale,
labels are integers ``0..num_classes-1``, one per image, and images have the shape the
model expects. One NaN pixel would make the first DP-SGD round turn the global model
into NaN, and pixels on the wrong scale train silently on garbage.

A failure is a :class:`DataFileError`: its message (for the node's log) names the
file, the record and the offending value; its :attr:`~DatasetError.public_reason`
(what a node tells the server) names only the file, the kind of problem and what is
allowed, never a value, a record index or a count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class DatasetError(RuntimeError):
    """A dataset could not be found, read or trusted."""

    @property
    def public_reason(self) -> str:
        """What a node may tell the server: no path, value or count (see its log)."""
        return "the node's data could not be loaded (DatasetError; details in its log)"


class DataFileError(DatasetError):
    """A data file that cannot be read or fails a check.

    ``problem`` and ``allowed`` describe the kind of failure and the rule; they hold
    no value of the data. ``detail`` (record index, value, shape, the reader's own
    message) goes to the log only.
    """

    def __init__(
        self, source: Path | str, problem: str, allowed: str, detail: str = ""
    ) -> None:
        self.source = Path(source)
        self.problem = problem
        self.allowed = allowed
        self.detail = detail
        where = f" ({detail})" if detail else ""
        super().__init__(f"{self.source}: {problem}{where}; {allowed}")

    @property
    def public_reason(self) -> str:
        """The file's name, the kind of problem and the rule; nothing of the data."""
        return (
            f"data file '{self.source.name}': {self.problem}; {self.allowed} "
            "(the record and value are in the node's log)"
        )


def reader_said(exc: BaseException) -> str:
    """A reader's exception for the log: ``zlib.error: ...``, ``EOFError: ...``."""
    kind = type(exc)
    module = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
    return f"{module}{kind.__qualname__}: {exc}"


def _first(bad: np.ndarray) -> tuple[int, ...]:
    """Index of the first True in ``bad`` (C order)."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))


def _where(index: tuple[int, ...], first_line: int | None) -> str:
    """``example 3, pixel (2, 5)``; with ``first_line`` also the file's line number."""
    record = f"example {index[0]}"
    if first_line is not None:
        record += f" (line {first_line + index[0]})"
    if len(index) > 1:
        record += f", pixel {tuple(int(i) for i in index[1:])}"
    return record


def check_images(
    x: np.ndarray,
    source: Path | str,
    *,
    dataset: str,
    side: int,
    max_value: float,
    first_line: int | None = None,
) -> np.ndarray:
    """Raw images as ``(N, side, side)``: real, finite, in ``0..max_value``.

    Accepts ``(N, side, side)``, ``(N, 1, side, side)`` or ``(N, side*side)``.
    ``first_line`` is the file line of record 0 (CSV), so errors can name the line.
    """
    allowed = (
        f"dataset '{dataset}' takes raw pixels: real numbers in 0..{max_value:g}, "
        f"shaped (N, {side}, {side}), (N, 1, {side}, {side}) or (N, {side * side})"
    )
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataFileError(
            source, "pixels are not real numbers", allowed, f"dtype {x.dtype}"
        )
    if x.ndim == 2 and x.shape[1] == side * side:
        x = x.reshape(-1, side, side)
    elif x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[1:] != (side, side):
        raise DataFileError(
            source, "images are not shaped as the model expects", allowed,
            f"shape {x.shape}",
        )  # fmt: skip
    if len(x) == 0:
        return x
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        at = _first(~np.isfinite(x))
        raise DataFileError(
            source, "a pixel is NaN or infinite", allowed,
            f"{_where(at, first_line)} is {x[at]}",
        )  # fmt: skip
    low, high = x.min(), x.max()  # two fast passes; locate only on failure
    if low < 0 or high > max_value:
        at = _first((x < 0) | (x > max_value))
        hint = f"; the largest pixel is {high:g}" if high > max_value else ""
        raise DataFileError(
            source, f"pixels lie outside 0..{max_value:g}", allowed,
            f"{_where(at, first_line)} is {x[at]:g}{hint}: rescale to 0..{max_value:g}",
        )  # fmt: skip
    if x.dtype.kind == "f" and high <= 1.0 and np.any(x != np.round(x)):
        # 0..1 floats pass the range check but would train on near-black images.
        raise DataFileError(
            source, "pixels look scaled to 0..1", allowed,
            f"every pixel is <= 1 and some are fractional; multiply by {max_value:g}",
        )  # fmt: skip
    return x


def check_labels(
    y: np.ndarray,
    count: int,
    source: Path | str,
    *,
    num_classes: int,
    first_line: int | None = None,
) -> np.ndarray:
    """Labels as int64: one integer in ``0..num_classes-1`` per image."""
    top = num_classes - 1
    allowed = f"labels are integers 0..{top}, one per image"
    kind = y.dtype.kind
    if kind not in "iuf":
        raise DataFileError(source, "labels are not numbers", allowed, f"dtype {y.dtype}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataFileError(
            source, "labels are not one number per image", allowed, f"shape {y.shape}"
        )
    if len(y) != count:
        raise DataFileError(
            source, "images and labels differ in number", allowed,
            f"{count} images but {len(y)} labels",
        )  # fmt: skip
    checks = (
        ("a label is NaN or infinite", ~np.isfinite(y) if kind == "f" else None),
        ("a label is not an integer", (y != np.round(y)) if kind == "f" else None),
        (f"labels lie outside 0..{top}", (y < 0) | (y > top)),
    )
    for problem, bad in checks:
        if bad is not None and bad.any():
            i = int(np.argmax(bad))
            raise DataFileError(
                source, problem, allowed, f"{_where((i,), first_line)} is {y[i]}"
            )
    return y.astype(np.int64)
