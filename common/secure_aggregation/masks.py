"""Uniform masks and compact integer vectors for secure aggregation.

The masks come from AES-256 in counter mode (``cryptography``), keyed by a
32-byte secret: a client's private mask seed, or the key two clients agree
(:func:`common.secure_aggregation.keys.agree`). The modulus is a power of two, so each
32-bit block of the key stream, reduced mod 2^b, is exactly uniform.

Flower's own ``pseudo_rand_gen`` (``secaggplus_utils``) is not used: it folds the
seed into 32 bits (XOR of its 4-byte words) and draws from NumPy's Mersenne
Twister with ``randint(0, modulus - 1)``, which never yields modulus − 1. A
server could search the 2^32 seeds of a mask, and a masked value would not be
uniform; ``tests/common/test_secagg_masks.py`` shows both.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
MAX_BITS = 32


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"mask width must be 1–{MAX_BITS} bits, got {bits}")


def mask(seed: bytes, count: int, bits: int, nonce: bytes = b"") -> np.ndarray:
    """``count`` integers uniform in [0, 2^bits), from AES-256-CTR keyed by ``seed``.

    ``nonce`` (at most 16 bytes) separates streams under one key, e.g. the
    rotation signs from a mask.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed has {SEED_BYTES} bytes, got {len(seed)}")
    if len(nonce) > 16:
        raise ValueError("a mask nonce has at most 16 bytes")
    _check_bits(bits)
    counter = nonce.ljust(16, b"\0")
    stream = Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor()
    words = np.frombuffer(stream.update(bytes(4 * count)), dtype="<u4").astype(np.uint64)
    return words & np.uint64((1 << bits) - 1)


def mask_nonce(server_round: int) -> bytes:
    """Binds a mask stream to its round (the keys are fresh each round as well)."""
    return b"mask" + server_round.to_bytes(8, "little")


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Integers in [0, 2^bits) as a little-endian bit string of ``bits`` each (uint8)."""
    _check_bits(bits)
    values = np.asarray(values, dtype=np.uint64)
    if values.ndim != 1:
        raise ValueError("pack takes a flat vector")
    if values.size and int(values.max()) >> bits:
        raise ValueError(f"a value does not fit in {bits} bits")
    as_bytes = values.astype("<u8").view(np.uint8).reshape(-1, 8)
    as_bits = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits]
    return np.packbits(as_bits.reshape(-1), bitorder="little")


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of :func:`pack`: ``count`` integers of ``bits`` each (uint64)."""
    _check_bits(bits)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError("a packed vector is a flat uint8 array")
    if packed.size != (count * bits + 7) // 8:
        raise ValueError(
            f"a packed vector of {count} values × {bits} bits has "
            f"{(count * bits + 7) // 8} bytes, got {packed.size}"
        )
    as_bits = np.unpackbits(packed, bitorder="little")[: count * bits].reshape(count, bits)
    padded = np.zeros((count, 64), dtype=np.uint8)
    padded[:, :bits] = as_bits
    return np.packbits(padded, axis=1, bitorder="little").view("<u8").reshape(count)
