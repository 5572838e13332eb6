"""One-run audit of a Gaussian-DP claim (Mahloujifar, Melis & Chaudhuri 2024,
"Auditing f-Differential Privacy in One Run", arXiv 2410.22235).

Steinke, Nasr & Jagielski's (ε, δ) test (:mod:`server.audit.privacy_audit`) bounds a
Gaussian mechanism far below its ε (about 0.4·ε) and, through its δ term, can never
certify more than about 6 at δ = 1e-5. The f-DP test asks a sharper question of the
same guesses: could a μ-GDP mechanism (the privacy curve the accountant assumes for
Gaussian releases) have produced this many right guesses? The paper's recursion for
guesses with abstention (the authors' PrivacyGuard implements the same) bounds the
probability of c right guesses out of c' under f-DP; a claim whose
bound is below the significance is rejected. The result is μ_lb: with 95 %
confidence the run is **not** μ-GDP for any μ ≤ μ_lb. It is a statement about the
GDP family only: μ_lb above the claimed μ proves the mechanism is not the Gaussian
mechanism it claims to be, which is what the self-test needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm

from server.audit.privacy_audit import guess_grid

FDP_METHOD = "mahloujifar-melis-chaudhuri-2024 f-DP one-run (Gaussian DP)"
_NORMAL = NormalDist()
_MU_MAX = 30.0
_TINY = 1e-300


def _blow_up_inverse(x: float, mu: float) -> float:
    """f̄⁻¹ for μ-GDP: Φ(Φ⁻¹(x) − μ), with x clamped into (0, 1)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    return _NORMAL.cdf(_NORMAL.inv_cdf(max(x, _TINY)) - mu)


def gdp_claim_rejected(
    mu: float, m: int, guesses: int, correct: int, significance: float
) -> bool:
    """True if ``correct`` of ``guesses`` (m canaries) rejects μ-GDP at
    ``significance`` (the paper's recursion for membership guesses, k = 2)."""
    if correct == 0:
        return False
    threshold = significance * guesses / m
    r = threshold * correct / guesses
    h = threshold * (guesses - correct) / guesses
    for i in range(correct - 1, -1, -1):
        h_next = max(h, _blow_up_inverse(r, mu))
        r = r + (i / (guesses - i)) * (h_next - h)
        h = h_next
    return r + h > guesses / m


def mu_lower_bound(m: int, guesses: int, correct: int, significance: float) -> float:
    """The largest μ whose GDP claim these counts reject (0 if none)."""
    if not gdp_claim_rejected(1e-6, m, guesses, correct, significance):
        return 0.0
    if gdp_claim_rejected(_MU_MAX, m, guesses, correct, significance):
        return _MU_MAX
    low, high = 1e-6, _MU_MAX
    while high - low > 1e-3:
        mid = (low + high) / 2
        if gdp_claim_rejected(mid, m, guesses, correct, significance):
            low = mid
        else:
            high = mid
    return low


def gdp_epsilon(mu: float, delta: float) -> float:
    """ε at δ of μ-GDP (Dong, Roth & Su 2019): δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)."""
    if mu <= 0:
        return 0.0

    def excess(eps: float) -> float:
        return (
            float(
                norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
            )
            - delta
        )

    if excess(0.0) <= 0:
        return 0.0
    high = 1.0
    while excess(high) > 0:
        high *= 2
    return float(brentq(excess, 0.0, high, xtol=1e-9))


@dataclass(frozen=True)
class GdpBound:
    """μ_lb (the run is not μ-GDP for μ ≤ μ_lb) and the counts behind it."""

    method: str
    canaries: int
    guesses: int
    correct: int
    confidence: float
    mu_lower_bound: float
    delta: float
    epsilon_of_mu_lower_bound: float  # ε at δ of μ_lb-GDP (within the GDP family)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gdp_lower_bound(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    confidence: float = 0.95,
) -> GdpBound:
    """μ_lb from canary scores: top/bottom r/2 guesses for r in the fixed grid of
    :func:`guess_grid`, union bound over the grid, as the (ε, δ) test does."""
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    m = int(s.size)
    order = np.argsort(-s, kind="stable")
    grid = guess_grid(m)
    significance = (1 - confidence) / len(grid)
    best = (0.0, grid[0], 0)
    for r in grid:
        k = r // 2
        correct = int(inc[order[:k]].sum() + (~inc[order[m - k :]]).sum())
        if correct * 2 <= 2 * k:  # no better than chance: rejects nothing
            continue
        mu = mu_lower_bound(m, 2 * k, correct, significance)
        if mu > best[0]:
            best = (mu, 2 * k, correct)
    mu, r, v = best
    return GdpBound(FDP_METHOD, m, r, v, confidence, mu, delta, gdp_epsilon(mu, delta))
