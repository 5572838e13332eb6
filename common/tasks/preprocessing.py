"""From a task's raw records to model input, with public constants only.

A task's preprocessing is part of the model a device receives: the export writes
:meth:`describe` into ``model.json`` and ``client.predict`` applies that description
without importing privfed (tests/common/test_task_api.py checks they agree). So
every constant here must be public (a published mean, a fixed range), never a
statistic of the private data, which would leak outside the DP accounting. Three
kinds:

- :class:`ImagePreprocessing`: grey images ``(N, side, side)`` on a raw scale
  ``0..pixel_scale``, normalised ``(x / scale - mean) / std`` to ``(N, 1, side, side)``
  (the built-in digits, MNIST and Fashion-MNIST tasks).
- :class:`AffinePreprocessing`: any numeric record ``(N, *raw_shape)``, mapped
  ``(x - offset) / scale`` per feature (broadcast): tabular columns, say.
- :class:`CallablePreprocessing`: a function named ``"module:function"`` that a
  device must be able to import too (``client.predict`` imports it).

Numpy at most at import: a ClientApp is a fresh process per message.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


def _shape(shape: tuple[int, ...]) -> bool:
    return bool(shape) and all(isinstance(d, int) and d >= 1 for d in shape)


def check_numeric(
    x: np.ndarray, raw_shape: tuple[int, ...], source: Path | str, task: str
) -> np.ndarray:
    """Raw records ``(N, *raw_shape)`` of real, finite numbers, or a DataFileError.

    What every non-image task's raw data must be: one NaN would turn the global
    model into NaN in the first DP-SGD round.
    """
    import numpy as np

    from common.data.checks import DataFileError

    shape = ", ".join(map(str, raw_shape))
    allowed = f"task '{task}' takes real, finite numbers shaped (N, {shape})"
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataFileError(
            source, "records are not real numbers", allowed, f"dtype {x.dtype}"
        )
    if x.ndim == 2 and len(raw_shape) > 1 and x.shape[1] == math.prod(raw_shape):
        x = x.reshape(-1, *raw_shape)
    if tuple(x.shape[1:]) != tuple(raw_shape):
        raise DataFileError(
            source, "records are not shaped as the task declares", allowed,
            f"shape {x.shape}",
        )  # fmt: skip
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        at = np.argwhere(~np.isfinite(x))[0]
        raise DataFileError(
            source, "a value is NaN or infinite", allowed, f"record {int(at[0])}"
        )
    return x


@dataclass(frozen=True)
class ImagePreprocessing:
    """Square grey images: ``x -> (x / pixel_scale - mean) / std``, channel added.

    ``mean`` and ``std`` are published training-set values (public), so the
    normalisation costs no privacy.
    """

    side: int  # images are (side, side) raw, (1, side, side) as model input
    pixel_scale: float  # raw pixels lie in 0..pixel_scale (16 for digits, 255 for IDX)
    mean: float
    std: float

    kind = "image"

    def __post_init__(self) -> None:
        bad = [
            name
            for name, wrong in {
                "side": not isinstance(self.side, int) or self.side < 1,
                "pixel_scale": not self.pixel_scale > 0,
                "mean": not math.isfinite(self.mean),
                "std": not self.std > 0 or not math.isfinite(self.std),
            }.items()
            if wrong
        ]
        if bad:
            raise ValueError(f"image preprocessing: invalid {', '.join(bad)}")

    @property
    def raw_shape(self) -> tuple[int, ...]:
        """Shape of one raw record: ``(side, side)``."""
        return (self.side, self.side)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one model input: ``(1, side, side)``."""
        return (1, self.side, self.side)

    def check(
        self, x: np.ndarray, source: Path | str, task: str, first_line: int | None = None
    ) -> np.ndarray:
        """Raw pixels, checked (common.data.checks): shape, finiteness, range."""
        from common.data.checks import check_images

        return check_images(
            x, source, dataset=task, side=self.side, max_value=self.pixel_scale,
            first_line=first_line,
        )  # fmt: skip

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Raw ``(N, H, W)`` pixels to normalised float32 ``(N, 1, H, W)``."""
        import numpy as np

        scaled = x.astype(np.float32) / self.pixel_scale
        return ((scaled - self.mean) / self.std)[:, None, :, :].astype(np.float32)

    def describe(self) -> dict[str, Any]:
        """Plain data for ``model.json``: enough to preprocess without this code."""
        return {
            "kind": self.kind,
            "raw_shape": list(self.raw_shape),
            "pixel_scale": self.pixel_scale,
            "mean": self.mean,
            "std": self.std,
            "note": "raw pixels x -> (x / pixel_scale - mean) / std, shape (N, 1, H, W)",
        }


def _floats(values: float | tuple[float, ...]) -> tuple[float, ...]:
    return tuple(float(v) for v in (values if isinstance(values, tuple) else (values,)))


@dataclass(frozen=True)
class AffinePreprocessing:
    """Numeric records: ``x -> (x - offset) / scale``, float32, shape kept.

    ``offset`` and ``scale`` are one number or one per feature of the last axis:
    public constants (a documented unit, a published reference range), never
    statistics of the private training records.
    """

    raw_shape: tuple[int, ...]
    offset: float | tuple[float, ...] = 0.0
    scale: float | tuple[float, ...] = 1.0

    kind = "affine"

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw_shape", tuple(self.raw_shape))
        object.__setattr__(self, "offset", _floats(self.offset))
        object.__setattr__(self, "scale", _floats(self.scale))
        width = self.raw_shape[-1] if _shape(self.raw_shape) else -1
        bad = [
            name
            for name, wrong in {
                "raw_shape": not _shape(self.raw_shape),
                "offset": len(self.offset) not in (1, width)
                or not all(map(math.isfinite, self.offset)),
                "scale": len(self.scale) not in (1, width)
                or not all(s > 0 and math.isfinite(s) for s in self.scale),
            }.items()
            if wrong
        ]
        if bad:
            raise ValueError(f"affine preprocessing: invalid {', '.join(bad)}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one model input: the raw shape."""
        return self.raw_shape

    def check(
        self, x: np.ndarray, source: Path | str, task: str, first_line: int | None = None
    ) -> np.ndarray:
        """Raw records, checked: real, finite, shaped ``(N, *raw_shape)``."""
        return check_numeric(x, self.raw_shape, source, task)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Raw records to float32 model input."""
        import numpy as np

        offset = np.asarray(self.offset, dtype=np.float32)
        scale = np.asarray(self.scale, dtype=np.float32)
        return ((x.astype(np.float32) - offset) / scale).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        """Plain data for ``model.json``."""
        return {
            "kind": self.kind,
            "raw_shape": list(self.raw_shape),
            "offset": list(self.offset),
            "scale": list(self.scale),
            "note": "raw records x -> (x - offset) / scale per feature (last axis)",
        }


@dataclass(frozen=True)
class CallablePreprocessing:
    """Any preprocessing, as a function ``"module:function"`` of raw records.

    The function maps ``(N, *raw_shape)`` numbers to float32 ``(N, *input_shape)``
    using public constants only. It is named, not held, so that ``model.json`` can
    say what a device must import to run the model (``client.predict`` imports it).
    """

    function: str
    raw_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    description: str = ""

    kind = "callable"

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw_shape", tuple(self.raw_shape))
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        module, _, name = self.function.partition(":")
        bad = [
            part
            for part, wrong in {
                "function": not module or not name,
                "raw_shape": not _shape(self.raw_shape),
                "input_shape": not _shape(self.input_shape),
            }.items()
            if wrong
        ]
        if bad:
            raise ValueError(f"callable preprocessing: invalid {', '.join(bad)}")

    def resolve(self) -> Callable[[np.ndarray], np.ndarray]:
        """The named function, imported now."""
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(module), name)

    def check(
        self, x: np.ndarray, source: Path | str, task: str, first_line: int | None = None
    ) -> np.ndarray:
        """Raw records, checked: real, finite, shaped ``(N, *raw_shape)``."""
        return check_numeric(x, self.raw_shape, source, task)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Raw records to float32 model input, by the named function."""
        import numpy as np

        out = np.asarray(self.resolve()(x), dtype=np.float32)
        if tuple(out.shape[1:]) != self.input_shape or len(out) != len(x):
            raise ValueError(
                f"preprocessing {self.function} returned shape {out.shape}, expected "
                f"(N={len(x)}, {', '.join(map(str, self.input_shape))})"
            )
        return out

    def describe(self) -> dict[str, Any]:
        """Plain data for ``model.json``: the function a device must import."""
        return {
            "kind": self.kind,
            "function": self.function,
            "raw_shape": list(self.raw_shape),
            "input_shape": list(self.input_shape),
            "note": self.description
            or f"raw records -> {self.function}(x); the module must be importable",
        }


Preprocessing = ImagePreprocessing | AffinePreprocessing | CallablePreprocessing
PREPROCESSING_KINDS = (ImagePreprocessing, AffinePreprocessing, CallablePreprocessing)
