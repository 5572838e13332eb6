"""One-run audit statistics (Steinke, Nasr & Jagielski 2023) against independent values."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from server.audit.privacy_audit import (
    ONE_RUN_METHOD,
    OneRunBound,
    epsilon_for_counts,
    guess_grid,
    one_run_lower_bound,
    one_run_p_value,
)


def _all_correct_closed_form(r: int, significance: float) -> float:
    """δ = 0, r of r right: P = q^r with q = e^ε/(1+e^ε), so ε = logit(τ^(1/r))."""
    q = significance ** (1 / r)
    return math.log(q / (1 - q))


def _exact_tail(r: int, v: int, eps: float) -> float:
    """P[Binomial(r, e^ε/(1+e^ε)) >= v] in exact integer arithmetic (no scipy)."""
    q = Fraction(math.exp(eps)) / (1 + Fraction(math.exp(eps)))
    return float(sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(v, r + 1)))


def _bisect(f, lo: float, hi: float) -> float:
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) else (lo, mid)
    return lo


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_correct_matches_closed_form(r: int) -> None:
    # e.g. 1000 of 1000 right at 95 %: ε ≥ logit(0.05^(1/1000)) = 5.809
    got = epsilon_for_counts(1000, r, r, delta=0.0, significance=0.05)
    assert got == pytest.approx(_all_correct_closed_form(r, 0.05), abs=1e-6)
    if r == 1000:
        assert got == pytest.approx(5.809, abs=1e-3)


@pytest.mark.parametrize(("r", "v"), [(100, 80), (200, 150), (60, 41)])
def test_delta_zero_matches_exact_binomial_tail(r: int, v: int) -> None:
    expected = _bisect(lambda e: _exact_tail(r, v, e) <= 0.05, 0.0, 20.0)
    assert epsilon_for_counts(1000, r, v, 0.0, 0.05) == pytest.approx(expected, abs=1e-4)


def _p_value_by_definition(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Algorithm 2 of the paper written out directly with exact tails."""
    beta = _exact_tail(r, v, eps)
    alpha = max((_exact_tail(r, v - i, eps) - beta) / i for i in range(1, v + 1))
    return min(beta + 2 * m * delta * alpha, 1.0)


@pytest.mark.parametrize(("m", "r", "v", "eps"), [(100, 40, 35, 1.0), (1000, 100, 90, 1.5)])
def test_delta_term_matches_algorithm_two(m: int, r: int, v: int, eps: float) -> None:
    for delta in (1e-5, 1e-3):
        assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(
            _p_value_by_definition(m, r, v, eps, delta), rel=1e-6
        )


def test_delta_only_lowers_the_bound() -> None:
    no_delta = epsilon_for_counts(1000, 200, 180, 0.0, 0.05)
    with_delta = epsilon_for_counts(1000, 200, 180, 1e-5, 0.05)
    big_delta = epsilon_for_counts(1000, 200, 180, 1e-3, 0.05)
    assert no_delta > with_delta > big_delta >= 0


def test_bound_grows_with_correct_guesses() -> None:
    bounds = [epsilon_for_counts(1000, 200, v, 1e-5, 0.05) for v in range(100, 201, 10)]
    assert bounds[0] == 0.0  # half right is chance
    assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[-1] > bounds[-2] > 0


def test_perfect_separation_uses_the_union_bounded_grid() -> None:
    m = 1000
    rng = np.random.default_rng(0)
    included = (
        rng.permutation(m) < m // 2
    )  # balanced, so m/2 top + m/2 bottom can all be right
    scores = included.astype(float) + rng.normal(0, 0.01, m)  # perfectly separable
    bound = one_run_lower_bound(scores, included, delta=0.0)
    grid = guess_grid(m)
    assert grid == [10, 20, 40, 80, 160, 320, 640, 1000]
    assert (bound.guesses, bound.correct) == (1000, 1000)
    assert bound.epsilon_lower_bound == pytest.approx(
        _all_correct_closed_form(1000, 0.05 / len(grid)), abs=1e-6
    )
    assert bound.method == ONE_RUN_METHOD and bound.to_dict()["canaries"] == m


def test_no_signal_gives_about_zero() -> None:
    rng = np.random.default_rng(1)
    bounds = []
    for _ in range(60):
        included = rng.random(500) < 0.5
        bounds.append(
            one_run_lower_bound(rng.normal(size=500), included, 1e-5).epsilon_lower_bound
        )
    # valid at 95 %: a positive bound should be rare and small
    assert sum(b > 0 for b in bounds) <= 6
    assert max(bounds) < 0.5


def test_inverted_scores_give_zero() -> None:
    included = np.arange(100) % 2 == 0
    assert (
        one_run_lower_bound(-included.astype(float), included, 1e-5).epsilon_lower_bound
        == 0
    )


@pytest.mark.parametrize(
    ("scores", "included", "delta", "confidence", "match"),
    [
        ([0.1], [True], 0.0, 0.95, "at least 2 canaries"),
        ([0.1, 0.2], [True], 0.0, 0.95, "equal length"),
        ([0.1, float("nan")], [True, False], 0.0, 0.95, "finite"),
        ([0.1, 0.2], [True, False], 0.0, 1.0, "confidence"),
        ([0.1, 0.2], [True, False], 1.0, 0.95, "delta"),
    ],
)
def test_bad_inputs_are_refused(scores, included, delta, confidence, match) -> None:
    with pytest.raises(ValueError, match=match):
        one_run_lower_bound(scores, included, delta, confidence)


def test_bound_record_is_validated() -> None:
    with pytest.raises(ValueError, match="correct"):
        OneRunBound(ONE_RUN_METHOD, 10, 4, 5, 0.95, 1e-5, 1.0)
