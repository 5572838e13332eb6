"""One flat vector as a Flower ``Array``, with its .npy header made once per layout.

Flower's ``Array(ndarray)`` runs ``np.save`` and ``Array.numpy()`` runs ``np.load``,
which parses the header with ``ast`` on every call: about 30 µs each way, for every
encoded update a client sends and the server reads (1,000 a round at 100,000 virtual
clients). Here the header comes from numpy's own writer (``numpy.lib.format``), once
per dtype and length, so the bytes are exactly Flower's (tests compare both ways);
reading takes the vector in place only when the bytes are exactly that header and
payload, and leaves anything else to ``Array.numpy()`` and its errors.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from flwr.app import Array
from flwr.common.constant import SType


@functools.lru_cache(maxsize=64)
def _header(descr: str, length: int) -> bytes:
    """The .npy (version 1.0) header ``np.save`` writes for a C-order ``descr[length]``."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": descr, "fortran_order": False, "shape": (length,)}
    )
    return out.getvalue()


def vector_array(vector: np.ndarray) -> Array:
    """``Array(vector)`` for a 1-D vector of a plain numeric dtype, without ``np.save``."""
    if vector.ndim != 1 or vector.dtype.hasobject:
        raise ValueError(f"a flat numeric vector, got {vector.dtype}{list(vector.shape)}")
    data = np.ascontiguousarray(vector)
    header = _header(np.lib.format.dtype_to_descr(data.dtype), data.size)
    return Array(
        dtype=str(data.dtype), shape=(data.size,), stype=SType.NUMPY,
        data=header + data.tobytes(),
    )  # fmt: skip


def vector_of(array: Array, dtype: np.dtype, length: int) -> np.ndarray | None:
    """The read-only ``dtype[length]`` vector ``array`` holds, if its bytes are exactly
    what :func:`vector_array` (and ``np.save``) writes for one; ``None`` otherwise."""
    if array.stype != SType.NUMPY:
        return None
    header = _header(np.lib.format.dtype_to_descr(dtype), length)
    data = array.data
    if len(data) != len(header) + length * dtype.itemsize or not data.startswith(header):
        return None
    return np.frombuffer(data, dtype=dtype, count=length, offset=len(header))
