"""The distributed Skellam mechanism: rotation, rounding, noise, wrap-around, planning."""

from __future__ import annotations

import math
import secrets

import numpy as np
import pytest
from scipy import linalg, stats

from common.privacy.randomness import integer_generator
from common.secure_aggregation.distributed_dp import (
    QuantisationPlan,
    conditional_rounding,
    hadamard,
    plan_skellam_round,
    rotate,
    rotation_signs,
    rounded_l2_bound,
    signed_integers,
    unrotate,
)


def test_hadamard_equals_scipy_matrix() -> None:
    """The O(D log D) butterfly is scipy's Hadamard matrix, normalised."""
    x = np.random.default_rng(0).standard_normal(64)
    assert np.allclose(hadamard(x), linalg.hadamard(64) @ x / 8)


def test_rotation_is_orthonormal_and_inverted() -> None:
    x = np.random.default_rng(1).standard_normal(1000)
    signs = rotation_signs(secrets.token_bytes(32), 1024)
    rotated = rotate(x, signs)
    assert math.isclose(np.linalg.norm(rotated), np.linalg.norm(x), rel_tol=1e-12)
    assert np.allclose(unrotate(rotated, signs, 1000), x)


def test_conditional_rounding_keeps_the_norm_bound_and_is_unbiased() -> None:
    gen = integer_generator()
    x = np.full(4096, 0.3)
    bound = rounded_l2_bound(float(np.linalg.norm(x)), x.size)
    draws = np.stack([conditional_rounding(x, bound, gen) for _ in range(200)])
    assert np.all(np.linalg.norm(draws, axis=1) <= bound)
    assert abs(draws.mean() - 0.3) < 0.01


def _plan(**changes: object) -> QuantisationPlan:
    values = dict(
        dim=4810, clip_norm=1.0, coordinate_clip=0.06, scale=3000.0, modulus_bits=16,
        noise_multiplier=1.0, min_contributors=4,
    )  # fmt: skip
    values.update(changes)
    return QuantisationPlan(**values)  # type: ignore[arg-type]


def test_the_sum_of_zero_updates_carries_the_noise_of_its_contributors() -> None:
    """k clients encoding a zero change: the decoded-domain sum is Sk(k·V/m) per
    coordinate, variance k·V/m (and never less than V once k ≥ m)."""
    plan = _plan()
    signs = rotation_signs(secrets.token_bytes(32), plan.padded_dim)
    zero = [np.zeros(plan.dim, dtype=np.float32)]
    for k in (4, 6):
        total = np.zeros(plan.padded_dim, dtype=np.uint64)
        for _ in range(k):
            total = (total + plan.encode(zero, signs, integer_generator())) % np.uint64(
                plan.modulus
            )
        noise = signed_integers(total, plan.modulus_bits).astype(np.float64)
        expected = k * plan.share_variance
        # variance of D samples: chi-square with D − 1 degrees of freedom
        ratio = noise.var(ddof=1) / expected
        dof = plan.padded_dim - 1
        low, high = stats.chi2.ppf([1e-4, 1 - 1e-4], dof) / dof
        assert low < ratio < high
        assert expected >= plan.guaranteed_variance


def test_encode_decode_recovers_the_sum_up_to_the_noise() -> None:
    """Three updates, summed in Z_M and decoded: the error is the noise, not a wrap."""
    plan = _plan(noise_multiplier=0.01, min_contributors=3)
    signs = rotation_signs(secrets.token_bytes(32), plan.padded_dim)
    rng = np.random.default_rng(2)
    updates = []
    for _ in range(3):
        u = rng.standard_normal(plan.dim)
        updates.append([(u / np.linalg.norm(u) * 0.9).astype(np.float32)])
    total = np.zeros(plan.padded_dim, dtype=np.uint64)
    for u in updates:
        total = (total + plan.encode(u, signs, integer_generator())) % np.uint64(
            plan.modulus
        )
    decoded = plan.decode(total, signs, [np.zeros(plan.dim, dtype=np.float32)])[0]
    truth = sum(u[0] for u in updates)
    noise_norm = math.sqrt(3 * plan.share_variance * plan.dim) / plan.scale
    assert np.linalg.norm(decoded - truth) < 3 * noise_norm + 0.05


def test_an_unclipped_update_is_clipped_again() -> None:
    """The sensitivity never rests on the caller: a norm-100 input encodes as norm C."""
    plan = _plan(noise_multiplier=0.01, min_contributors=10_000)  # noise ≪ C
    signs = rotation_signs(secrets.token_bytes(32), plan.padded_dim)
    big = [np.full(plan.dim, 100 / math.sqrt(plan.dim), dtype=np.float32)]
    decoded = plan.decode(plan.encode(big, signs, integer_generator()), signs, big)[0]
    assert np.linalg.norm(decoded) < 1.05


def test_plan_fits_the_modulus_and_says_when_it_cannot() -> None:
    """The chosen scale keeps the wrap probability at its target; a modulus too small
    for the cohort is refused, naming the run key."""
    plan = plan_skellam_round(26010, 1.0, 0.75, 100, 90, 16)
    assert plan.wrap_probability(100) <= 1e-6
    assert plan.quantisation_inflation() < 1.001
    finer = QuantisationPlan(**{**plan.__dict__, "scale": plan.scale * 1.5})
    assert finer.wrap_probability(100) > 1e-6
    with pytest.raises(ValueError, match="secagg-modulus-range"):
        plan_skellam_round(26010, 1.0, 0.75, 100, 90, 8)


def test_release_never_counts_more_noise_than_the_uploads_carry() -> None:
    plan = _plan()
    release = plan.release(6, 0.5)
    assert release.variance == pytest.approx(6 * plan.share_variance)
    with pytest.raises(ValueError, match="never unmasked"):
        plan.release(3, 0.5)
