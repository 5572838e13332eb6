"""The f-DP one-run audit (Mahloujifar, Melis & Chaudhuri 2024) against independent
references: dp-accounting's PLD for the ε of μ-GDP, and simulated Gaussian
mechanisms whose μ is known."""

from __future__ import annotations

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant

from server.audit.fdp_one_run import (
    gdp_claim_rejected,
    gdp_epsilon,
    gdp_lower_bound,
    mu_lower_bound,
)


@pytest.mark.parametrize("sigma", [0.6, 1.0, 3.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_gdp_epsilon_matches_the_pld_of_one_gaussian(sigma: float, delta: float) -> None:
    """One Gaussian mechanism with sensitivity 1 and noise σ is exactly (1/σ)-GDP."""
    pld = PLDAccountant()
    pld.compose(dp_event.GaussianDpEvent(sigma))
    assert gdp_epsilon(1 / sigma, delta) == pytest.approx(
        pld.get_epsilon(delta), rel=2e-3, abs=2e-3
    )


def test_a_stronger_claim_is_easier_to_reject() -> None:
    """Rejection is monotone in μ (the bisection relies on it), and chance rejects none."""
    flags = [
        gdp_claim_rejected(mu, 5000, 640, 600, 0.005) for mu in np.linspace(0.01, 5, 60)
    ]
    assert flags[0] and not flags[-1]
    assert flags == sorted(flags, reverse=True)
    assert mu_lower_bound(5000, 640, 320, 0.005) == 0.0


@pytest.mark.parametrize("mu", [0.3, 1.0, 2.0])
def test_a_gaussian_mechanism_is_never_bounded_above_its_mu(mu: float) -> None:
    """Scores N(μ·b, 1) are exactly μ-GDP per canary: μ_lb stays at most μ, over
    10 seeds, and is a sizeable share of it (the audit can tell)."""
    found = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        included = rng.random(2000) < 0.5
        scores = rng.standard_normal(2000) + mu * included
        found.append(gdp_lower_bound(scores, included, 1e-5).mu_lower_bound)
    print(f"μ {mu}: μ_lb from {min(found):.3f} to {max(found):.3f}")
    assert max(found) <= mu
    assert np.median(found) > 0.3 * mu
