"""Compressed updates: what leaves a client, after its DP noise, in fewer bytes.

A client that compresses sends the change of its model against the global model the
server sent that round (for client-level DP: its clipped change), encoded by the run
key ``update-compression``; the server decodes it against the same global model
before validation and aggregation. Encoding happens after the DP noise (or after the
clipping the server's noise covers), so it is post-processing: ε is unchanged.

Encodings (each one :class:`~flwr.app.ArrayRecord` with one array, ``ENCODED_ARRAY``;
every array Flower sends costs about 500 bytes of record overhead, so the whole
change travels as one):

- ``float16``: the change, all arrays concatenated, rounded to float16 (deterministic;
  half the bytes of float32).
- ``int8``, ``int4``, ``int2``: per model array, the change's minimum ``lo`` and step
  ``(max − lo) / (2^b − 1)``, then each value as a b-bit code by *stochastic rounding*
  (up with probability equal to the remainder), packed little-endian into bytes. The
  decoded value ``lo + code·step`` is unbiased (its mean is the value sent) and within
  one step of it. The wire vector is uint8: first the (lo, step) pairs as little-endian
  float32, then each array's packed codes.

The rounding's randomness comes from OS entropy (:func:`common.privacy.randomness.
integer_generator`), never from the seed, except under ``reproducible-noise = true``
(which replays every draw of a client, and is not private against the server).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord

from common.run_keys import UPDATE_COMPRESSIONS
from common.wire.flat_arrays import vector_array, vector_of

ENCODED_ARRAY = "encoded"  # the one array of an encoded change's ArrayRecord

# update-compression -> bits per value; "none" sends float32 weights (no encoding)
BITS: dict[str, int] = {"none": 32, "float16": 16, "int8": 8, "int4": 4, "int2": 2}
if tuple(BITS) != UPDATE_COMPRESSIONS:
    raise ImportError("common.wire.update_codec.BITS must name every update-compression")

_HEADER = np.dtype("<f4")  # lo and step of one array
FLOAT16_RELATIVE = 2.0**-11  # float16 round-to-nearest: |e| ≤ 2^-11·|x| (normal range)
FLOAT16_ABSOLUTE = 2.0**-25  # ... and ≤ 2^-25 among the subnormals
FLOAT16_MAX = float(np.finfo(np.float16).max)


class CodecError(ValueError):
    """An encoded change that does not decode against the model (wrong layout, length,
    dtype, or non-finite scales), or a change that cannot be encoded."""


@dataclass(frozen=True)
class DecodedChange:
    """A decoded change (float64, the model's shapes) and a bound on the L2 norm of
    its difference from the change the client encoded (the codec's error)."""

    arrays: tuple[np.ndarray, ...]
    error_norm: float


@dataclass(frozen=True)
class UpdateCodec:
    """One ``update-compression`` encoding other than ``none``."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in BITS or self.name == "none":
            allowed = ", ".join(repr(n) for n in UPDATE_COMPRESSIONS if n != "none")
            raise CodecError(f"unknown update encoding {self.name!r}; one of {allowed}")

    @property
    def bits(self) -> int:
        """Bits per value on the wire (before the per-array header)."""
        return BITS[self.name]

    @property
    def quantised(self) -> bool:
        """True for the b-bit codes with stochastic rounding (``int*``)."""
        return self.name.startswith("int")

    def encoded_length(self, shapes: Sequence[tuple[int, ...]]) -> int:
        """Values (float16) or bytes (``int*``) of the encoded vector for ``shapes``."""
        sizes = [math.prod(s) for s in shapes]
        if not self.quantised:
            return sum(sizes)
        per_byte = 8 // self.bits
        return _HEADER.itemsize * 2 * len(sizes) + sum(-(-n // per_byte) for n in sizes)

    # -- client side ------------------------------------------------------------------
    def encode(self, change: Sequence[np.ndarray], rng: np.random.Generator) -> ArrayRecord:
        """The change's wire form; ``rng`` draws the stochastic rounding (OS entropy)."""
        values = [_float64(a) for a in change]
        if not self.quantised:
            flat = np.concatenate([v.ravel() for v in values]) if values else np.zeros(0)
            if flat.size and float(np.max(np.abs(flat))) > FLOAT16_MAX:
                raise CodecError(
                    f"a change value exceeds float16's range ({FLOAT16_MAX:g}); use "
                    "update-compression 'none' or an 'int*' encoding"
                )
            vector = flat.astype(np.float16)
        else:
            header = np.zeros((len(values), 2), dtype=_HEADER)
            parts = []
            for index, value in enumerate(values):
                lo, step = _scale(value, self.bits)
                header[index] = (lo, step)
                codes = _stochastic_codes(value.ravel(), lo, step, self.bits, rng)
                parts.append(_pack(codes, self.bits))
            vector = np.concatenate([header.reshape(-1).view(np.uint8), *parts])
        return ArrayRecord({ENCODED_ARRAY: vector_array(vector)})

    # -- server side ------------------------------------------------------------------
    def decode(self, record: ArrayRecord, reference: Sequence[np.ndarray]) -> DecodedChange:
        """The change ``record`` encodes for a model shaped like ``reference``; anything
        off the layout raises :class:`CodecError` with what was expected."""
        keys = list(record.keys())
        if keys != [ENCODED_ARRAY]:
            raise CodecError(
                f"an {self.name} change is one array {ENCODED_ARRAY!r}, got {keys}"
            )
        for want in reference:
            if not np.issubdtype(want.dtype, np.floating):
                raise CodecError(f"the model holds a {want.dtype} array; only floats")
        shapes = [tuple(a.shape) for a in reference]
        dtype = np.dtype(np.uint8 if self.quantised else np.float16)
        length = self.encoded_length(shapes)
        encoded = record[ENCODED_ARRAY]
        vector = vector_of(encoded, dtype, length)
        if vector is None:  # not the layout expected: numpy reads it, for the error
            try:
                vector = encoded.numpy()
            except (ValueError, TypeError) as exc:  # bytes that are not an array
                raise CodecError(f"the encoded change does not decode: {exc}") from None
        if vector.dtype != dtype or vector.shape != (length,):
            raise CodecError(
                f"an {self.name} change for this model is {dtype}[{length}], got "
                f"{vector.dtype}{list(vector.shape)}"
            )
        if self.quantised:
            return self._decode_codes(vector, shapes)
        if not np.isfinite(vector).all():
            raise CodecError("the float16 change holds NaN or infinite values")
        flat = vector.astype(np.float64)
        arrays = _split(flat, shapes)
        # |e| ≤ 2^-11·|x| + 2^-25 per value, and |x| ≤ |decoded| + |e|: twice the
        # decoded side's terms bound ‖e‖.
        bound = 2 * (
            FLOAT16_RELATIVE * float(np.linalg.norm(flat))
            + FLOAT16_ABSOLUTE * math.sqrt(flat.size)
        )
        return DecodedChange(arrays, bound)

    def _decode_codes(
        self, vector: np.ndarray, shapes: list[tuple[int, ...]]
    ) -> DecodedChange:
        count = len(shapes)
        header = vector[: _HEADER.itemsize * 2 * count].view(_HEADER).reshape(count, 2)
        header = header.astype(np.float64)
        if not np.isfinite(header).all() or (header[:, 1] < 0).any():
            raise CodecError("the encoded change's (lo, step) header is not finite and ≥ 0")
        offset = _HEADER.itemsize * 2 * count
        per_byte = 8 // self.bits
        arrays, squared_error = [], 0.0
        for (lo, step), shape in zip(header, shapes, strict=True):
            n = math.prod(shape)
            size = -(-n // per_byte)
            codes = _unpack(vector[offset : offset + size], self.bits, n)
            offset += size
            value = lo + codes.astype(np.float64) * step
            if not np.isfinite(value).all():
                raise CodecError("the encoded change decodes to non-finite values")
            arrays.append(value.reshape(shape))
            squared_error += n * step * step
        return DecodedChange(tuple(arrays), math.sqrt(squared_error))


def codec_for(name: str) -> UpdateCodec | None:
    """The codec of an ``update-compression`` value; ``None`` for ``none``."""
    return None if name == "none" else UpdateCodec(name)


def encode_change(
    name: str,
    after: Sequence[np.ndarray],
    before: Sequence[np.ndarray],
    rng: np.random.Generator,
) -> ArrayRecord:
    """``after − before`` (a model and the global model it started from), encoded."""
    change = [_float64(a) - _float64(b) for a, b in zip(after, before, strict=True)]
    return UpdateCodec(name).encode(change, rng)


def apply_change(
    reference: Sequence[np.ndarray], change: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """The weights ``reference + change`` in the reference's dtypes (the server's view
    of a compressed weights reply)."""
    with np.errstate(over="ignore"):  # past the dtype's range: inf, which is checked
        return [
            (_float64(ref) + delta).astype(ref.dtype)
            for ref, delta in zip(reference, change, strict=True)
        ]


# -- internals --------------------------------------------------------------------------
def _float64(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise CodecError(f"only float arrays are encoded, got {array.dtype}")
    if not np.isfinite(array).all():
        raise CodecError("the change holds NaN or infinite values")
    return array.astype(np.float64)


def _scale(value: np.ndarray, bits: int) -> tuple[np.float32, np.float32]:
    """float32 ``lo ≤ min`` and ``step`` with ``lo + (2^b − 1)·step ≥ max``, so every
    value lies on the code range (rounded outward, never inward)."""
    if value.size == 0:
        return np.float32(0), np.float32(0)
    low, high = float(value.min()), float(value.max())
    lo = np.float32(low)
    if float(lo) > low:
        lo = np.nextafter(lo, np.float32(-np.inf))
    levels = 2**bits - 1
    step = np.float32((high - float(lo)) / levels)
    while float(lo) + levels * float(step) < high:
        step = np.nextafter(step, np.float32(np.inf))
    if not (math.isfinite(float(lo)) and math.isfinite(float(step))):
        raise CodecError("the change's range exceeds float32")
    return lo, step


def _stochastic_codes(
    flat: np.ndarray, lo: np.float32, step: np.float32, bits: int, rng: np.random.Generator
) -> np.ndarray:
    levels = 2**bits - 1
    if float(step) == 0:
        return np.zeros(flat.size, dtype=np.uint8)
    scaled = (flat - float(lo)) / float(step)
    codes = np.floor(scaled + rng.random(flat.size))
    return np.clip(codes, 0, levels).astype(np.uint8)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    per_byte = 8 // bits
    padded = np.zeros(-(-codes.size // per_byte) * per_byte, dtype=np.uint8)
    padded[: codes.size] = codes
    groups = padded.reshape(-1, per_byte)
    packed = np.zeros(groups.shape[0], dtype=np.uint8)
    for slot in range(per_byte):
        packed |= groups[:, slot] << np.uint8(bits * slot)
    return packed


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    per_byte = 8 // bits
    mask = np.uint8(2**bits - 1)
    shifts = np.arange(per_byte, dtype=np.uint8) * np.uint8(bits)
    codes = (packed[:, None] >> shifts[None, :]) & mask
    return codes.reshape(-1)[:count]


def _split(flat: np.ndarray, shapes: list[tuple[int, ...]]) -> tuple[np.ndarray, ...]:
    arrays, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        arrays.append(flat[offset : offset + n].reshape(shape))
        offset += n
    return tuple(arrays)
