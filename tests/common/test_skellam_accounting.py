"""The Skellam accountant against independent computations.

- the RDP bound (Agarwal, Kairouz & Liu 2021) is never below the exact Rényi
  divergence of the Skellam distributions, computed here from Bessel functions;
- the subsampling bound (Zhu & Wang 2019) is never below dp-accounting's exact
  Poisson-subsampled Gaussian, and close to it;
- the composed, subsampled ε of a one-dimensional Skellam mechanism is never below
  dp-accounting's PLD accountant on the exact probability mass functions, and
  within a few tens of percent of it;
- in the large-variance limit the Skellam ε approaches dp-accounting's Gaussian ε.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld
from scipy import special

from common.secure_aggregation.distributed_dp import rounded_l1_bound, rounded_l2_bound
from common.secure_aggregation.skellam_accounting import (
    ORDERS,
    SkellamRound,
    calibrate_skellam_noise_multiplier,
    composed_epsilon,
    skellam_rdp,
    subsampled_rdp,
)

DELTA = 1e-5


def skellam_log_pmf(values: np.ndarray, variance: float) -> np.ndarray:
    """log P(Sk(V) = k) = log(e^{−V} I_|k|(V)), from scipy's scaled Bessel function."""
    with np.errstate(divide="ignore"):
        return np.log(special.ive(np.abs(values), variance))


def exact_rdp(shift: np.ndarray, variance: float, order: int) -> float:
    """D_α(Sk(V)+δ ‖ Sk(V)) for an integer shift vector δ: a sum over coordinates."""
    total = 0.0
    for step in shift:
        span = int(abs(step) + 60 * math.sqrt(variance) + 60)
        k = np.arange(-span, span + 1)
        lp, lq = skellam_log_pmf(k - step, variance), skellam_log_pmf(k, variance)
        keep = np.isfinite(lp) & np.isfinite(lq)
        total += special.logsumexp(order * lp[keep] + (1 - order) * lq[keep]) / (order - 1)
    return total


@pytest.mark.parametrize("variance", [5.0, 40.0, 400.0])
@pytest.mark.parametrize("shift", [[1], [3], [2, -1, 1], [6, 2]])
@pytest.mark.parametrize("order", [2, 8, 32])
def test_rdp_bound_is_never_below_the_exact_divergence(
    variance: float, shift: list[int], order: int
) -> None:
    vector = np.array(shift)
    l1, l2 = float(np.abs(vector).sum()), float(np.linalg.norm(vector))
    exact = exact_rdp(vector, variance, order)
    bound = skellam_rdp(order, variance, l1, l2)
    assert bound >= exact * (1 - 1e-9)
    if variance >= 400:  # large variance: the bound is nearly tight
        assert bound <= exact * 1.05 + 1e-6


def _gaussian_curve(z: float) -> np.ndarray:
    return np.array([0.0, 0.0, *[a / (2 * z * z) for a in range(2, ORDERS[-1] + 1)]])


@pytest.mark.parametrize(("q", "z"), [(0.01, 0.8), (0.1, 1.5), (0.5, 3.0)])
def test_subsampling_bound_holds_against_dp_accounting(q: float, z: float) -> None:
    """Zhu & Wang's general bound on the Gaussian curve ≥ the exact subsampled Gaussian."""
    curve = _gaussian_curve(z)
    ours = np.array([subsampled_rdp(a, q, curve) for a in ORDERS])
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    exact = dp_accounting.rdp.RdpAccountant(orders=list(ORDERS)).compose(event)
    rdp_exact = np.array(exact._rdp)  # noqa: SLF001 (dp-accounting keeps it here)
    assert np.all(ours >= rdp_exact * (1 - 1e-9))
    assert np.all(ours <= curve[list(ORDERS)])  # sampling never costs more
    # how loose it is shows in ε: test_large_variance_approaches_the_gaussian


def _pld_one_dim(variance: float, shift: int, q: float, rounds: int) -> float:
    """dp-accounting's PLD ε of the Poisson-subsampled 1-D Skellam mechanism."""
    span = int(shift + 40 * math.sqrt(variance) + 40)
    k = np.arange(-span, span + 1)
    base = skellam_log_pmf(k, variance)
    shifted = skellam_log_pmf(k - shift, variance)
    if q < 1:
        mixture = np.logaddexp(np.log1p(-q) + base, math.log(q) + shifted)
    else:
        mixture = shifted
    lower = {int(v): float(p) for v, p in zip(k, base, strict=True) if np.isfinite(p)}
    upper = {int(v): float(p) for v, p in zip(k, mixture, strict=True) if np.isfinite(p)}
    epsilons = []
    for low, up in ((lower, upper), (upper, lower)):  # remove and add adjacency
        dist = pld.from_two_probability_mass_functions(
            low, up, value_discretization_interval=1e-3
        )
        epsilons.append(dist.self_compose(rounds).get_epsilon_for_delta(DELTA))
    return max(epsilons)


@pytest.mark.parametrize(("variance", "shift", "q", "rounds"), [
    (30.0, 4, 0.1, 20), (200.0, 10, 0.05, 50), (20.0, 3, 1.0, 3),
])  # fmt: skip
def test_composed_epsilon_against_dp_accounting_pld(
    variance: float, shift: int, q: float, rounds: int
) -> None:
    ours = composed_epsilon(
        [SkellamRound(variance, float(shift), float(shift), q)] * rounds, DELTA
    )
    independent = _pld_one_dim(variance, shift, q, rounds)
    assert ours >= independent
    # RDP with Zhu & Wang's general subsampling bound is looser than the exact PLD,
    # not wildly (at q = 0.1 and 20 rounds: 3.22 against 1.93)
    assert ours <= independent * 1.8


@pytest.mark.parametrize(("q", "rounds"), [(1.0, 1), (0.01, 100)])
def test_large_variance_approaches_the_gaussian(q: float, rounds: int) -> None:
    """With Δ₂ = 10⁴ (V = (zΔ₂)²) the correction terms vanish: ε ≈ the Gaussian's."""
    z, l2 = 1.0, 1e4
    ours = composed_epsilon([SkellamRound((z * l2) ** 2, l2 * 181, l2, q)] * rounds, DELTA)
    accountant = dp_accounting.rdp.RdpAccountant()
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    else:
        event = dp_accounting.GaussianDpEvent(z)
    gaussian = accountant.compose(event, rounds).get_epsilon(DELTA)
    assert gaussian * 0.99 <= ours <= gaussian * 1.15


def test_calibration_reaches_the_target_from_above() -> None:
    l2 = 5000.0
    l1 = rounded_l1_bound(l2, 32768)
    z = calibrate_skellam_noise_multiplier(3.0, DELTA, 0.01, 100, l1, l2)
    at = composed_epsilon([SkellamRound((z * l2) ** 2, l1, l2, 0.01)] * 100, DELTA)
    assert 2.95 <= at <= 3.0


def test_rounded_norm_bounds() -> None:
    """Never below the input norm, never above the trivial C + √D."""
    for norm, dim in [(1.0, 16), (100.0, 1024), (5000.0, 32768)]:
        bound = rounded_l2_bound(norm, dim)
        assert norm < bound <= norm + math.sqrt(dim)
    assert rounded_l1_bound(3.0, 100) == 9.0  # an integer vector: ‖x‖₁ ≤ ‖x‖₂²
