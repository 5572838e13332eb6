"""The client-level white-box audit (issue 28): canary clients scored on every round's
release by the likelihood ratio of the subsampled Gaussian, beside the final-model
cosine. Driven in process with the harness of ``test_client_level_audit``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from server.audit.canary_clients import CanaryClients, canary_audit_line
from server.audit.white_box import likelihood_ratio_scores, round_projection
from tests.server.test_client_level_audit import (  # noqa: F401 - fixture
    Z_EPS8_5_ROUNDS,
    _run,
    _server_identity,
    _strategy,
)


def test_the_score_is_the_mixture_likelihood_ratio() -> None:
    """Against scipy's densities: log[(1−q)φ(y) + qφ(y − μ)] − log φ(y), summed."""
    rng = np.random.default_rng(0)
    y = rng.normal(size=(20, 6)) * 2
    for q, z in ((0.5, 1.3), (0.01, 0.7), (1.0, 2.0)):
        mu = 1 / z
        mixture = np.log(
            (1 - q) * stats.norm.pdf(y) + q * stats.norm.pdf(y, loc=mu)
        ) - stats.norm.logpdf(y)
        got = likelihood_ratio_scores(y, q, z)
        np.testing.assert_allclose(got, mixture.sum(axis=1), rtol=1e-9, atol=1e-9)


def test_a_projection_is_in_units_of_the_noise() -> None:
    """One canary at C/(q·n) along u_0: y_0 = 1/z, the other directions ≈ 0."""
    canaries = CanaryClients(50, 0, 0.5, [np.zeros(2000, np.float32)])
    update = canaries.directions[0].astype(np.float64) * 2.0 / 10.0  # C 2, q·n 10
    y = round_projection(canaries.directions, update, 2.0, 10.0, 4.0)
    assert y[0] == pytest.approx(0.25, rel=1e-5)
    assert np.abs(y[1:]).max() < 0.25 * 5 / math.sqrt(2000) * 4


def test_the_default_count_is_1000_canary_clients() -> None:
    assert CanaryClients(-1, 0, 0.5, [np.zeros(10, np.float32)]).count == 1000


def test_white_box_is_sound_and_sees_more_than_the_final_model(tmp_path: Path) -> None:
    """ε 8 over 5 rounds at q ½ (OS-entropy noise): the white-box bound stays at most
    the ledger's ε, and its block and plot are written beside the black-box ones."""
    strategy = _strategy(tmp_path, Z_EPS8_5_ROUNDS, 5, seed=4)
    _, final = _run(strategy, 5, seed=4)
    reported = strategy.ledger.epsilon()
    block = strategy.audit_block(final)
    assert block is not None
    json.dumps(block, allow_nan=False)
    white = block["white_box"]
    print(f"ε {reported:.3f}: black-box {block['epsilon_lower_bound']:.3f}, "
          f"white-box {white['epsilon_lower_bound']:.3f}")  # fmt: skip
    assert white["rounds_observed"] == 5 and white["canaries"] == 1000
    assert white["method"].startswith("steinke-nasr-jagielski-2023")
    assert 0 <= white["epsilon_lower_bound"] <= reported
    assert white["epsilon_lower_bound"] >= block["epsilon_lower_bound"] - 0.5
    assert (tmp_path / "results" / white["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert "white-box (every round's update) ε ≥" in canary_audit_line(block)


def test_with_little_noise_the_white_box_bound_is_large(tmp_path: Path) -> None:
    """z 0.05 over 6 rounds: each release shows which canaries were in it (only the
    1/64 of included canaries never sampled look excluded)."""
    strategy = _strategy(tmp_path, 0.05, 6, seed=3)
    _, final = _run(strategy, 6, seed=3)
    block = strategy.audit_block(final)
    assert block is not None
    white = block["white_box"]
    print(f"z 0.05: black-box {block['epsilon_lower_bound']:.3f}, "
          f"white-box {white['epsilon_lower_bound']:.3f}")  # fmt: skip
    assert white["epsilon_lower_bound"] > 3
