"""Masks and packing: exact uniformity, round trips, and why Flower's PRG is not used."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from scipy import stats

from common.secure_aggregation.masks import mask, pack, unpack


def test_masks_are_uniform_and_keyed() -> None:
    """Every residue mod 2^b is reached with equal frequency; another key, another
    stream; another nonce under one key, another stream."""
    seed = bytes(range(32))
    values = mask(seed, 200_000, 4)
    counts = np.bincount(values.astype(np.int64), minlength=16)
    assert stats.chisquare(counts).pvalue > 1e-4
    assert not np.array_equal(values, mask(bytes(32), 200_000, 4))
    assert not np.array_equal(values, mask(seed, 200_000, 4, nonce=b"other"))
    assert np.array_equal(values, mask(seed, 200_000, 4))  # the server can recompute it


def test_flower_prg_has_a_32_bit_key_and_never_draws_the_top_residue() -> None:
    """Flower's pseudo_rand_gen XORs the seed into 32 bits, so two different 32-byte
    seeds give the same mask (a server could search 2^32 seeds); and randint(0, M−1)
    never yields M − 1. privfed's masks have neither flaw."""
    a = bytes(32)
    b = (1).to_bytes(4, "little") * 2 + bytes(24)  # the two words XOR to zero
    flower_a = pseudo_rand_gen(a, 16, [(10_000,)])[0]
    flower_b = pseudo_rand_gen(b, 16, [(10_000,)])[0]
    assert np.array_equal(flower_a, flower_b)
    assert 15 not in set(flower_a.tolist())
    ours_a, ours_b = mask(a, 10_000, 4), mask(b, 10_000, 4)
    assert not np.array_equal(ours_a, ours_b)
    assert 15 in set(ours_a.tolist())


@pytest.mark.parametrize("bits", [1, 8, 13, 16, 20, 32])
def test_pack_round_trip(bits: int) -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2**bits, size=1001, dtype=np.uint64)
    packed = pack(values, bits)
    assert packed.dtype == np.uint8 and packed.size == (1001 * bits + 7) // 8
    assert np.array_equal(unpack(packed, bits, 1001), values)


def test_pack_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        pack(np.array([16], dtype=np.uint64), 4)
    with pytest.raises(ValueError, match="bytes"):
        unpack(np.zeros(3, dtype=np.uint8), 16, 2)


def test_secret_sharing_rebuilds_from_any_threshold_and_not_below() -> None:
    """Any t of k shares rebuild the secret; t − 1 do not; each 16-byte chunk is
    pycryptodome's own Shamir share."""
    import itertools
    import os

    from Crypto.Protocol.SecretSharing import Shamir

    from common.secure_aggregation.keys import combine, split

    secret = os.urandom(32)
    shares = split(secret, 3, 5)
    for subset in itertools.combinations(shares, 3):
        assert combine(list(subset)) == secret
    assert combine(shares[:2]) != secret
    chunk = Shamir.combine(
        [(int.from_bytes(s[:4], "little"), s[4:20]) for s in shares[1:4]], ssss=False
    )
    assert chunk == secret[:16]
    with pytest.raises(ValueError, match="repeated"):
        combine([shares[0], shares[0], shares[1]])


def test_key_agreement_is_symmetric_and_separates_purposes() -> None:
    from common.secure_aggregation.keys import (
        ENCRYPTION,
        MASKING,
        agree,
        new_secret,
        public_key,
    )

    a, b = new_secret(), new_secret()
    assert agree(a, public_key(b), MASKING) == agree(b, public_key(a), MASKING)
    assert agree(a, public_key(b), MASKING) != agree(a, public_key(b), ENCRYPTION)
    with pytest.raises(ValueError, match="X25519"):
        agree(a, b"short", MASKING)
