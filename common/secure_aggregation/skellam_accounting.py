"""ε of the distributed Skellam mechanism: RDP, Poisson subsampling, composition.

The mechanism (:mod:`common.secure_aggregation.distributed_dp`) releases an integer
vector sum plus Skellam noise Sk(V) = Poisson(V/2) − Poisson(V/2) per coordinate
(variance V).
Its Rényi DP is Agarwal, Kairouz & Liu 2021 ("The Skellam Mechanism for
Differentially Private Federated Learning", Theorem 3.5), in the integer domain,
for an L1 sensitivity Δ₁ and L2 sensitivity Δ₂ and every integer order α > 1::

    ε(α) ≤ α Δ₂² / (2V) + min(((2α − 1) Δ₂² + 6 Δ₁) / (4V²), 3 Δ₁ / (2V))

Client sampling with probability q (Poisson) amplifies it by Zhu & Wang 2019
("Poisson Subsampled Rényi Differential Privacy", Theorem 6), the general upper
bound that holds for any mechanism at integer orders; the unsampled ε(α) is a
bound too, and the smaller of the two is used. Rounds compose by adding RDP, and
RDP becomes (ε, δ) with the conversion Opacus' RDP accountant uses (Balle et al.
2020), so a Skellam ε and an Opacus ε are directly comparable.

Sensitivities after the mechanism's conditional randomized rounding are
:func:`common.secure_aggregation.distributed_dp.rounded_l2_bound` and ``rounded_l1_bound``.

The tests check the RDP bound against the exact Rényi divergence of Skellam
distributions and the composed ε against Google's dp-accounting (its PLD accountant
on the exact probability mass functions, and its Gaussian accountant in the
large-variance limit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from common.privacy.accountants.opacus_rdp import get_privacy_spent

# Integer orders only: the subsampling bound (Zhu & Wang, Theorem 6) is for integer α.
ORDERS: tuple[int, ...] = tuple(range(2, 129)) + (160, 192, 256)
ACCOUNTANT_NAME = "skellam-rdp"


@dataclass(frozen=True)
class SkellamRound:
    """One round's release: noise variance V per coordinate, sensitivities, rate q."""

    variance: float  # V of the summed Skellam noise, integer domain
    l1_sensitivity: float  # Δ₁, integer domain
    l2_sensitivity: float  # Δ₂, integer domain
    sampling_rate: float  # q: each client joins the round with this probability

    def __post_init__(self) -> None:
        for name in ("variance", "l1_sensitivity", "l2_sensitivity"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(
                    f"Skellam round {name} must be finite and > 0, got {value}"
                )
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling rate must be in (0, 1], got {self.sampling_rate}")

    def to_dict(self) -> dict[str, float]:
        """Plain data for a ledger file."""
        return {
            "variance": self.variance,
            "l1_sensitivity": self.l1_sensitivity,
            "l2_sensitivity": self.l2_sensitivity,
            "sampling_rate": self.sampling_rate,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, float]) -> SkellamRound:
        """The inverse of :meth:`to_dict` (values are checked on creation)."""
        return cls(
            float(raw["variance"]),
            float(raw["l1_sensitivity"]),
            float(raw["l2_sensitivity"]),
            float(raw["sampling_rate"]),
        )


def skellam_rdp(order: int, variance: float, l1: float, l2: float) -> float:
    """ε(α) of one Skellam release (Agarwal, Kairouz & Liu 2021, Theorem 3.5)."""
    if order < 2 or int(order) != order:
        raise ValueError(
            f"the Skellam RDP bound is used at integer orders ≥ 2, got {order}"
        )
    a = float(order)
    correction = min(
        ((2 * a - 1) * l2**2 + 6 * l1) / (4 * variance**2), 3 * l1 / (2 * variance)
    )
    return a * l2**2 / (2 * variance) + correction


def _log_binomial(n: int, k: np.ndarray) -> np.ndarray:
    from scipy import special

    return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)


def subsampled_rdp(order: int, rate: float, curve: np.ndarray) -> float:
    """RDP at ``order`` of the Poisson-subsampled mechanism with RDP ``curve``.

    ``curve[ℓ]`` is the unsampled mechanism's ε(ℓ) for every integer ℓ from 2 to
    ``order`` (entries 0 and 1 are unused). Zhu & Wang 2019, Theorem 6 (general
    upper bound, any mechanism, integer α), or the unsampled ε(α) when that is
    smaller (or q = 1).
    """
    from scipy import special  # here: the ledger module is on every ServerApp's path

    a = int(order)
    unsampled = float(curve[a])
    if rate >= 1:
        return unsampled
    log_q, log_1q = math.log(rate), math.log1p(-rate)
    terms = [(a - 1) * log_1q + math.log(a * rate - rate + 1)]
    terms.append(math.log(special.comb(a, 2)) + 2 * log_q + (a - 2) * log_1q + curve[2])
    if a >= 3:
        ells = np.arange(3, a + 1)
        terms.extend(
            math.log(3) + _log_binomial(a, ells) + ells * log_q + (a - ells) * log_1q
            + (ells - 1) * curve[3 : a + 1]
        )  # fmt: skip
    return min(unsampled, float(special.logsumexp(terms)) / (a - 1))


def skellam_curve(release: SkellamRound, max_order: int = ORDERS[-1]) -> np.ndarray:
    """ε(ℓ) of one unsampled release for ℓ = 0 … ``max_order`` (0 and 1 unused)."""
    curve = np.zeros(max_order + 1)
    for order in range(2, max_order + 1):
        curve[order] = skellam_rdp(
            order, release.variance, release.l1_sensitivity, release.l2_sensitivity
        )
    return curve


def round_rdp(release: SkellamRound, amplified: bool = True) -> np.ndarray:
    """RDP vector of one round at :data:`ORDERS` (amplified by sampling, or not)."""
    return _round_rdp(
        release.variance, release.l1_sensitivity, release.l2_sensitivity,
        release.sampling_rate if amplified else 1.0,
    )  # fmt: skip


@lru_cache(maxsize=4096)
def _round_rdp(variance: float, l1: float, l2: float, rate: float) -> np.ndarray:
    curve = skellam_curve(SkellamRound(variance, l1, l2, rate))
    vector = np.array([subsampled_rdp(order, rate, curve) for order in ORDERS])
    vector.setflags(write=False)
    return vector


def epsilon_from_rdp(rdp: np.ndarray, delta: float) -> float:
    """(ε, δ) from an RDP vector at :data:`ORDERS` (Opacus' conversion)."""
    if not np.any(rdp):
        return 0.0
    epsilon, _ = get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return float(epsilon)


def composed_epsilon(
    releases: Sequence[SkellamRound], delta: float, amplified: bool = True
) -> float:
    """Cumulative ε of ``releases`` at δ; 0 for none."""
    if not releases:
        return 0.0
    total = sum(round_rdp(r, amplified) for r in releases)
    return epsilon_from_rdp(np.asarray(total), delta)


def calibrate_skellam_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    rounds: int,
    l1: float,
    l2: float,
    tolerance: float = 0.002,
) -> float:
    """Least z (noise std = z·Δ₂) whose ``rounds`` releases end at or below the target.

    Bisection on z with V = (z·Δ₂)²; the result errs on the noisy side.
    """
    if not (target_epsilon > 0 and rounds >= 1):
        raise ValueError("calibration needs a target ε > 0 and at least one round")

    def epsilon(z: float) -> float:
        release = SkellamRound((z * l2) ** 2, l1, l2, sampling_rate)
        return epsilon_from_rdp(round_rdp(release) * rounds, delta)

    low, high = 0.05, 1.0
    while epsilon(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"no noise multiplier reaches ε = {target_epsilon}")
    while high - low > tolerance * high:
        mid = (low + high) / 2
        if epsilon(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
