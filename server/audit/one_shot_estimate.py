"""The ε estimate of Andrew et al. 2024 ("One-shot Empirical Privacy Estimation for
Federated Learning", ICLR): canary cosines fitted by Gaussians, ε of the pair.

A canary client's update is a random unit direction u. After the run, the cosine
between the final model change and u is the attacker's statistic. For a direction the
run never saw it is distributed as the cosine of a random direction in d dimensions,
≈ N(0, 1/d) (the "null"); for an included canary it is fitted by N(μ, σ²). The
estimate is the ε, at the run's δ, of the pair of Gaussians: the smallest ε for which
both hockey-stick divergences δ_{P‖Q}(ε) and δ_{Q‖P}(ε) are at most δ. It is an
estimate, not a bound: it assumes the fitted Gaussians describe the statistic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import optimize, stats

EPSILON_CAP = 500.0  # beyond this the pair is reported as distinguishable (ε = ∞)


def _log_mass(lo: float, hi: float, mean: float, std: float) -> float:
    """log P(lo < X < hi) for X ~ N(mean, std²), accurate in the tails."""
    a, b = (lo - mean) / std, (hi - mean) / std
    if a >= b:
        return -math.inf
    if math.isinf(b):
        return float(stats.norm.logsf(a))
    if math.isinf(a):
        return float(stats.norm.logcdf(b))
    if a > 0:  # both in the right tail: difference of survival functions
        upper, lower = stats.norm.logsf(a), stats.norm.logsf(b)
    else:
        upper, lower = stats.norm.logcdf(b), stats.norm.logcdf(a)
    if lower == -math.inf:
        return float(upper)
    return float(upper + math.log1p(-math.exp(min(lower - upper, 0.0))))


def _regions(
    mean_p: float, std_p: float, mean_q: float, std_q: float, epsilon: float
) -> list[tuple[float, float]]:
    """The intervals where log p(x)/q(x) > ε (the privacy loss is a quadratic in x)."""
    a = 0.5 / std_q**2 - 0.5 / std_p**2
    b = mean_p / std_p**2 - mean_q / std_q**2
    c = 0.5 * (mean_q / std_q) ** 2 - 0.5 * (mean_p / std_p) ** 2 + math.log(std_q / std_p)
    c -= epsilon
    if abs(a) <= 1e-12 * max(abs(b), 1e-300):  # equal variances: a half-line
        if b == 0:
            return [(-math.inf, math.inf)] if c > 0 else []
        root = -c / b
        return [(root, math.inf)] if b > 0 else [(-math.inf, root)]
    disc = b * b - 4 * a * c
    if disc <= 0:
        return [(-math.inf, math.inf)] if a > 0 else []
    r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
    return [(-math.inf, r1), (r2, math.inf)] if a > 0 else [(r1, r2)]


def log_hockey_stick(
    mean_p: float, std_p: float, mean_q: float, std_q: float, epsilon: float
) -> float:
    """log δ_{P‖Q}(ε) = log sup_S [P(S) − e^ε Q(S)], P = N(mean_p, std_p²), Q alike."""
    regions = _regions(mean_p, std_p, mean_q, std_q, epsilon)
    if not regions:
        return -math.inf
    log_p = float(
        np.logaddexp.reduce([_log_mass(lo, hi, mean_p, std_p) for lo, hi in regions])
    )
    log_q = float(
        np.logaddexp.reduce([_log_mass(lo, hi, mean_q, std_q) for lo, hi in regions])
    )
    gap = epsilon + log_q - log_p
    if log_p == -math.inf or gap >= 0:
        return -math.inf
    return log_p + math.log1p(-math.exp(gap))


def epsilon_of_gaussians(
    mean_p: float, std_p: float, mean_q: float, std_q: float, delta: float
) -> float:
    """The least ε ≥ 0 with δ_{P‖Q}(ε) ≤ δ and δ_{Q‖P}(ε) ≤ δ (∞ past EPSILON_CAP)."""
    if not (std_p > 0 and std_q > 0):
        raise ValueError(f"standard deviations must be > 0, got {std_p}, {std_q}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    log_delta = math.log(delta)

    def excess(eps: float) -> float:  # > 0 while the pair is not (ε, δ)-close
        worst = max(
            log_hockey_stick(mean_p, std_p, mean_q, std_q, eps),
            log_hockey_stick(mean_q, std_q, mean_p, std_p, eps),
        )
        return max(worst, -1e6) - log_delta

    if excess(0.0) <= 0:
        return 0.0
    low, high = 0.0, 1.0
    while excess(high) > 0:
        if high >= EPSILON_CAP:
            return math.inf
        low, high = high, min(2 * high, EPSILON_CAP)
    return float(optimize.brentq(excess, low, high, xtol=1e-9, rtol=1e-10))


@dataclass(frozen=True)
class OneShotEstimate:
    """Andrew et al.'s estimate from one run's canary cosines (an estimate, not a bound)."""

    epsilon: float  # included canaries' Gaussian vs the null N(0, 1/d)
    epsilon_empirical_null: float  # ... vs a Gaussian fitted to the excluded canaries
    delta: float
    dimension: int  # d, the number of model parameters
    mean_in: float
    std_in: float
    mean_out: float
    std_out: float

    def __post_init__(self) -> None:
        if self.dimension < 2:
            raise ValueError(f"dimension must be >= 2, got {self.dimension}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; an infinite ε is ``None`` (JSON has no infinity)."""
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                for k, v in asdict(self).items()}  # fmt: skip


def one_shot_estimate(
    cos_in: Sequence[float], cos_out: Sequence[float], dimension: int, delta: float
) -> OneShotEstimate:
    """Fit N(μ, σ²) to the included canaries' cosines; ε against N(0, 1/d) and against
    the excluded canaries' fitted Gaussian. Needs at least two of each."""
    inside, outside = np.asarray(cos_in, float), np.asarray(cos_out, float)
    if inside.size < 2 or outside.size < 2:
        raise ValueError(
            f"the estimate needs >= 2 included and >= 2 excluded canaries, got "
            f"{inside.size} and {outside.size}"
        )
    mean_in, std_in = float(inside.mean()), float(inside.std(ddof=1))
    mean_out, std_out = float(outside.mean()), float(outside.std(ddof=1))
    null_std = dimension**-0.5
    tiny = 1e-12 * null_std  # a degenerate fit (all cosines equal) stays computable
    return OneShotEstimate(
        epsilon=epsilon_of_gaussians(0.0, null_std, mean_in, max(std_in, tiny), delta),
        epsilon_empirical_null=epsilon_of_gaussians(
            mean_out, max(std_out, tiny), mean_in, max(std_in, tiny), delta
        ),
        delta=delta,
        dimension=dimension,
        mean_in=mean_in,
        std_in=std_in,
        mean_out=mean_out,
        std_out=std_out,
    )
