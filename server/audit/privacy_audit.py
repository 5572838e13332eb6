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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import binom

from common.audit.canaries import (
    CANARY_KIND,
    CANARY_SCORE,
    INCLUSION_PROBABILITY,
    canary_plan,
)
from common.config import RunConfig
from common.data.datasets import load_dataset
from common.data.features import compute_features
from common.tasks.models import build_run_model

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


# --- the sample-level audit of a finished run -------------------------------------------


@dataclass(frozen=True)
class SampleLevelAudit:
    """Scores of every canary under the final model, their inclusion, and the bound."""

    bound: OneRunBound
    scores: np.ndarray
    included: np.ndarray

    def to_dict(self, reported_epsilon: float | None) -> dict[str, Any]:
        """The ``audit`` block of ``summary.json``."""
        return {
            **self.bound.to_dict(),
            "privacy_unit": "record",
            "canary": CANARY_KIND,
            "inclusion_probability": INCLUSION_PROBABILITY,
            "included": int(self.included.sum()),
            "score": CANARY_SCORE,
            "guess_rule": f"top and bottom r/2 scores for r in {GUESS_RULE}, union bound",
            "reported_epsilon": reported_epsilon,
            "plot": AUDIT_PLOT,
        }


AUDIT_PLOT = "audit-scores.png"
GUESS_RULE = "10, 20, 40, ... and m"


def canary_scores(
    model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor
) -> np.ndarray:
    """Log-probability of each canary's (wrong) training label: high = likely trained."""
    model.eval()
    with torch.no_grad():
        log_probs = torch.log_softmax(model(x), dim=1)
    return log_probs.gather(1, labels.long()[:, None])[:, 0].double().numpy()


def check_canaries(cfg: RunConfig) -> None:
    """Fail before round 1 if ``audit-canaries`` does not fit the training pool."""
    data = load_dataset(cfg.task, cfg.data_dir, cfg.seed)
    canary_plan(cfg.seed, cfg.audit_canaries, data.y_train, data.num_classes)


def audit_sample_level(
    cfg: RunConfig, state_dict: Mapping[str, torch.Tensor]
) -> SampleLevelAudit:
    """Score the run's canaries (common/audit/canaries.py) with the final global weights."""
    data = load_dataset(cfg.task, cfg.data_dir, cfg.seed)
    plan = canary_plan(cfg.seed, cfg.audit_canaries, data.y_train, data.num_classes)
    model = build_run_model(cfg, data.num_classes)
    model.load_state_dict(state_dict)
    # the server's round-1 weights (server/app.py builds them from the seed alike)
    initial = build_run_model(cfg, data.num_classes, seed=cfg.seed)
    x = compute_features(cfg.features, torch.from_numpy(data.x_train[plan.indices]))
    labels = torch.from_numpy(plan.labels)
    scores = canary_scores(model, x, labels) - canary_scores(initial, x, labels)
    bound = one_run_lower_bound(scores, plan.included, cfg.delta)
    return SampleLevelAudit(bound, scores, plan.included)


def plot_scores(
    scores: np.ndarray,
    included: np.ndarray,
    xlabel: str,
    title: str,
    path: Path,
    null_std: float | None = None,
) -> Path:
    """Histograms of the canary scores, included against excluded; with ``null_std``,
    as densities beside the null N(0, null_std²) of canaries the run never saw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    fig, ax = plt.subplots(figsize=(6, 4))
    low, high = float(scores.min()), float(scores.max())
    margin = max(high - low, null_std or 0.0) / 10
    bins = np.linspace(low - margin, high + margin + 1e-9, 40)
    density = null_std is not None
    for mask, name in ((included, "in"), (~included, "out")):
        ax.hist(scores[mask], bins=bins, alpha=0.6, density=density,
                label=f"{name} ({int(mask.sum())})")  # fmt: skip
    if null_std is not None:
        grid = np.linspace(bins[0], bins[-1], 400)
        ax.plot(grid, stats.norm.pdf(grid, scale=null_std), "k--", label="null N(0, 1/d)")
    ax.set(xlabel=xlabel, ylabel="density" if density else "canaries", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def audit_log_line(
    bound: OneRunBound, reported_epsilon: float | None, private: bool
) -> str:
    """The final log line: the audited bound beside the reported ε."""
    if not private:
        reported = "∞ (non-private)"
    elif reported_epsilon is None:
        reported = "not released (the nodes keep their ledgers)"
    else:
        reported = f"{reported_epsilon:.3f}"
    return (
        f"audited ε lower bound {bound.epsilon_lower_bound:.3f} "
        f"({bound.confidence:.0%}, one-run, {bound.canaries} canaries) "
        f"vs reported ε {reported}"
    )


def run_sample_level_audit(
    cfg: RunConfig,
    state_dict: Mapping[str, torch.Tensor],
    reported_epsilon: float | None,
    out_dir: Path,
) -> tuple[dict[str, Any], str]:
    """Audit a finished run: the ``audit`` summary block and the log line; writes the
    score plot into ``out_dir``."""
    audit = audit_sample_level(cfg, state_dict)
    plot_scores(
        audit.scores,
        audit.included,
        "gain in log-probability of the canary's wrong label (final - initial model)",
        f"one-run audit, {audit.bound.canaries} canaries: "
        f"ε ≥ {audit.bound.epsilon_lower_bound:.2f}",
        out_dir / AUDIT_PLOT,
    )
    line = audit_log_line(audit.bound, reported_epsilon, cfg.is_private)
    return audit.to_dict(reported_epsilon), line
