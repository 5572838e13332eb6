"""White-box canary scores: what a server that keeps every round's release can test.

The black-box audit scores a canary client by the cosine of its direction u_i with
the final model change. The server sees more: each round's noised mean update Δ_t.
For a canary sampled at rate q, y_{i,t} = ⟨Δ_t, u_i⟩·(q·n)/(C_t·z) ≈ N(μ·b_{i,t}, 1)
with μ = 1/z (b = 1 if canary i was in round t's cohort), up to the small
interference of the other updates. The likelihood-ratio test of "included" against
"excluded" for this Poisson-subsampled Gaussian (the mechanism the accountant
analyses) scores canary i by

    Σ_t log(1 − q + q·exp(μ·y_{i,t} − μ²/2)),

which reduces to the sum of projections when q = 1. Everything in it (q, z, C_t,
q·n) is public to the server, so the score is fixed before the inclusion is known
and the one-run bound (Steinke, Nasr & Jagielski 2023) applies to it as it does to
any score.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from server.audit.one_shot_estimate import epsilon_of_gaussians
from server.audit.privacy_audit import one_run_lower_bound, plot_scores

SCORE = (
    "sum over rounds of log(1 - q + q*exp(mu*y - mu^2/2)), y = <round update, u_i> "
    "* q*n / (C_t z), mu = 1/z: the likelihood ratio of the subsampled Gaussian"
)
PLOT = "audit-scores-white-box.png"


def round_projection(
    directions: np.ndarray,
    mean_update: np.ndarray,
    clip_norm: float,
    expected_cohort: float,
    noise_multiplier: float,
) -> np.ndarray:
    """y_{i,t}: round t's released mean update on each u_i, in units of the noise."""
    flat = np.asarray(mean_update, dtype=np.float32)
    raw = (directions @ flat).astype(np.float64)
    return raw * expected_cohort / (clip_norm * noise_multiplier)


def likelihood_ratio_scores(
    projections: np.ndarray, sampling_rate: float, noise_multiplier: float
) -> np.ndarray:
    """Σ_t log(1 − q + q·e^{μy − μ²/2}) per canary (rows: canaries, columns: rounds)."""
    mu = 1.0 / noise_multiplier
    log_in = np.log(sampling_rate) + mu * projections - mu * mu / 2
    if sampling_rate >= 1:
        return log_in.sum(axis=1)
    return np.logaddexp(math.log1p(-sampling_rate), log_in).sum(axis=1)


def gaussian_fit_epsilon(scores: np.ndarray, included: np.ndarray, delta: float) -> float:
    """ε of Gaussians fitted to the included and excluded scores (an estimate only)."""
    inside, outside = scores[included], scores[~included]
    if min(inside.size, outside.size) < 2:
        return math.nan
    tiny = 1e-12 * (float(np.abs(scores).max()) or 1.0)
    return epsilon_of_gaussians(
        float(outside.mean()), max(float(outside.std(ddof=1)), tiny),
        float(inside.mean()), max(float(inside.std(ddof=1)), tiny), delta,
    )  # fmt: skip


def white_box_block(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    rounds: int,
    out_dir: Path | None,
) -> dict[str, Any]:
    """The ``white_box`` part of the audit block (the one-run bound on the
    likelihood-ratio scores), and its score histogram."""
    bound = one_run_lower_bound(scores.tolist(), included.tolist(), delta)
    # No Gaussian-fit estimate here: likelihood-ratio scores are far from Gaussian.
    block: dict[str, Any] = {**bound.to_dict(), "score": SCORE, "rounds_observed": rounds}
    if out_dir is not None and rounds:
        block["plot"] = plot_scores(
            scores, included, "white-box score (likelihood ratio over rounds)",
            f"client-level white-box audit: ε ≥ {bound.epsilon_lower_bound:.2f}",
            out_dir / PLOT,
        ).name  # fmt: skip
    return block
