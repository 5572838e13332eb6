"""One client's model change clipped to L2 norm C: the sensitivity of client-level DP.

The client clips before its update leaves (so the server never receives an unclipped
update) and the server clips again on receipt (so a client that skipped it cannot
raise the sensitivity the accountant assumed). Both sides call :func:`clip_update`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class UpdateError(ValueError):
    """An update that cannot be clipped: non-float arrays, or values that are not finite."""


@dataclass(frozen=True)
class ClippedUpdate:
    """The clipped arrays, the norm before clipping, and the adaptive-clipping bit."""

    arrays: tuple[np.ndarray, ...]
    norm: float
    clip_norm: float

    @property
    def below_clip(self) -> bool:
        """Andrew et al. 2021's indicator: the norm was at most C (nothing removed)."""
        return self.norm <= self.clip_norm


def update_norm(arrays: Sequence[np.ndarray]) -> float:
    """Global L2 norm over every array of an update (float arrays only)."""
    total = 0.0
    for array in arrays:
        if not np.issubdtype(array.dtype, np.floating):
            raise UpdateError(
                f"an update holds a {array.dtype} array; client-level DP clips float "
                "arrays only (models must have no integer buffers)"
            )
        total += float(np.sum(np.square(array, dtype=np.float64)))
    if not math.isfinite(total):
        raise UpdateError("an update holds NaN or infinite values")
    return math.sqrt(total)


# Scaling to exactly C can land a float32 update up to ~1e-7 above C; clipping to
# C·(1 − 1e-6) keeps every clipped update at most C, as the sensitivity assumes.
CLIP_MARGIN = 1e-6


def clip_update(arrays: Sequence[np.ndarray], clip_norm: float) -> ClippedUpdate:
    """Scale ``arrays`` so their joint L2 norm is at most ``clip_norm``."""
    if not clip_norm > 0:
        raise ValueError(f"clip norm must be > 0, got {clip_norm!r}")
    norm = update_norm(arrays)
    factor = 1.0
    if norm > clip_norm:
        factor = clip_norm * (1 - CLIP_MARGIN) / norm
    clipped = tuple((np.asarray(a, dtype=a.dtype) * factor).astype(a.dtype) for a in arrays)
    return ClippedUpdate(clipped, norm, clip_norm)
