"""Empirical privacy audit: a statistically valid lower bound on ε from one training run.

The statistics follow Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1)
Training Run" (NeurIPS): m canaries, each included independently with probability ½; the
auditor guesses "in" for the canaries with the highest scores and "out" for the lowest;
if the run is (ε, δ)-DP, the number of correct guesses is stochastically dominated by a
Binomial(r, e^ε / (1 + e^ε)) plus a δ term (their Theorem 5.2 / Algorithm 2). The largest
ε that this test rejects at the chosen confidence is the lower bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import binom

ONE_RUN_METHOD = "steinke-nasr-jagielski-2023 one-run"
# Smallest number of guesses tried; the grid then doubles up to all m canaries.
_FIRST_GUESSES = 10
# Beyond this ε the binomial tail underflows; no audit of this kind gets near it.
_EPS_CAP = 50.0


@dataclass(frozen=True)
class OneRunBound:
    """The outcome of a one-run audit: the ε lower bound and the counts behind it."""

    method: str
    canaries: int  # m
    guesses: int  # r = k+ + k- actually made
    correct: int  # v
    confidence: float
    delta: float
    epsilon_lower_bound: float

    def __post_init__(self) -> None:
        if self.canaries < 2:
            raise ValueError(f"audit needs at least 2 canaries, got {self.canaries}")
        if not 0 < self.guesses <= self.canaries:
            raise ValueError(
                f"guesses must be in 1..{self.canaries} (canaries), got {self.guesses}"
            )
        if not 0 <= self.correct <= self.guesses:
            raise ValueError(
                f"correct must be in 0..{self.guesses} (guesses), got {self.correct}"
            )
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if not 0 <= self.delta < 1:
            raise ValueError(f"delta must be in [0, 1), got {self.delta}")
        if not (math.isfinite(self.epsilon_lower_bound) and self.epsilon_lower_bound >= 0):
            raise ValueError(
                "epsilon_lower_bound must be finite and >= 0, "
                f"got {self.epsilon_lower_bound}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def one_run_p_value(
    m: int, guesses: int, correct: int, epsilon: float, delta: float
) -> float:
    """P[at least ``correct`` of ``guesses`` right] under an (ε, δ)-DP run with m canaries.

    Algorithm 2 of the paper: β is the Binomial(r, e^ε/(1+e^ε)) upper tail at v; δ adds
    2·m·δ·α, where α = max over i in 1..v of (tail at v − i minus β) / i.
    """
    q = float(expit(epsilon))
    beta = float(binom.sf(correct - 1, guesses, q))
    if delta == 0 or correct == 0:
        return min(beta, 1.0)
    shifts = np.arange(1, correct + 1)
    tails = binom.sf(correct - shifts - 1, guesses, q) - beta
    alpha = float(np.max(tails / shifts))
    return min(beta + 2 * m * delta * alpha, 1.0)


def epsilon_for_counts(
    m: int, guesses: int, correct: int, delta: float, significance: float
) -> float:
    """Largest ε whose (ε, δ)-DP claim the counts reject at ``significance`` (0 if none)."""

    def margin(eps: float) -> float:  # > 0 while the claim at eps is rejected
        return significance - one_run_p_value(m, guesses, correct, eps, delta)

    if margin(0.0) <= 0:
        return 0.0
    hi = 1.0
    while margin(hi) > 0:
        if hi >= _EPS_CAP:
            return _EPS_CAP
        hi = min(2 * hi, _EPS_CAP)
    return float(brentq(margin, 0.0, hi, xtol=1e-9))


def guess_grid(m: int) -> list[int]:
    """The data-independent numbers of guesses r tried: 10, 20, 40, … and m (even r ≤ m).

    Fixed before any score is seen, so a union bound over the grid keeps the confidence
    valid (the paper's best-of-all-k choice would not be).
    """
    grid: list[int] = []
    r = _FIRST_GUESSES
    while r < m:
        grid.append(r)
        r *= 2
    grid.append(m - m % 2)
    return sorted(set(max(g, 2) for g in grid))


def one_run_lower_bound(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    confidence: float = 0.95,
) -> OneRunBound:
    """ε lower bound at ``confidence`` from canary scores (Steinke, Nasr & Jagielski 2023).

    Higher score = more likely included. For each r in :func:`guess_grid` (10, 20, 40, …,
    m; fixed before looking at the scores) guess "in" for the r/2 top scores and "out"
    for the r/2 bottom ones (ties broken by canary index), and apply the paper's binomial
    test with the δ term at significance (1 − confidence)/len(grid). By the union bound
    the largest of these bounds holds at ``confidence``. Each canary must have been
    included independently with probability ½.
    """
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    if s.ndim != 1 or s.shape != inc.shape:
        raise ValueError(
            "scores and included must be 1-d of equal length, "
            f"got {s.shape} and {inc.shape}"
        )
    m = int(s.size)
    if m < 2:
        raise ValueError(f"audit needs at least 2 canaries, got {m}")
    if not np.all(np.isfinite(s)):
        raise ValueError("canary scores must be finite (got NaN or inf)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")

    order = np.argsort(-s, kind="stable")  # best "in" candidates first
    grid = guess_grid(m)
    significance = (1 - confidence) / len(grid)
    best: tuple[float, int, int] | None = None
    for r in grid:
        k = r // 2
        correct = int(inc[order[:k]].sum() + (~inc[order[m - k :]]).sum())
        eps = epsilon_for_counts(m, 2 * k, correct, delta, significance)
        if best is None or eps > best[0]:
            best = (eps, 2 * k, correct)
    assert best is not None
    eps, r, v = best
    return OneRunBound(
        method=ONE_RUN_METHOD,
        canaries=m,
        guesses=r,
        correct=v,
        confidence=confidence,
        delta=delta,
        epsilon_lower_bound=eps,
    )
