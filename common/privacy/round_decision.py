"""Decide, before any training step, what this round would cost and whether to train.

Shared: a client decides each round with it, and a launcher checks a run's first
round for every partition before anything starts (``simulations/launch/preflight.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from common.config import RunConfig
from common.ledger.privacy_ledger import BudgetCheck, PrivacyLedger
from common.privacy.dp_sgd_plan import (
    RoundPlan,
    calibrate_gaussian_noise_multiplier,
    plan_dp_sgd_round,
)


@dataclass(frozen=True)
class RoundDecision(BudgetCheck):
    """σ, the planned round, ε before and after it, and whether it fits the budget."""

    plan: RoundPlan = field(kw_only=True)
    noise_multiplier: float = field(kw_only=True)


@lru_cache(maxsize=64)
def _calibrated_sigma(
    target_epsilon: float, delta: float, sample_rate: float, total_steps: int, acc: str
) -> float:
    return calibrate_gaussian_noise_multiplier(
        target_epsilon, delta, sample_rate, total_steps, acc
    )


def noise_multiplier_for(
    cfg: RunConfig, plan: RoundPlan, ledger: PrivacyLedger, run_id: int
) -> float:
    """σ for this client: fixed key, or calibrated once per run for every round of it.

    Calibration uses the ledger's δ (the node's policy δ), at which ε is reported.
    A later run calibrates its own σ; the lifetime budget still caps the total.
    """
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    if ledger.noise_multiplier and ledger.runs and ledger.runs[-1] == run_id:
        return ledger.noise_multiplier  # keep the σ of this client's first round in the run
    return _calibrated_sigma(
        cfg.target_epsilon,
        ledger.delta,
        plan.sample_rate,
        plan.steps * cfg.num_rounds,
        cfg.accountant,
    )


def decide_round(
    cfg: RunConfig,
    num_examples: int,
    ledger: PrivacyLedger,
    policy_budget: float,
    run_id: int = 0,
) -> RoundDecision:
    """Plan the round and compute the ε it would bring, without training.

    The cap is the smaller of the run's budget and the node policy's.
    """
    plan = plan_dp_sgd_round(num_examples, cfg.batch_size, cfg.local_epochs)
    sigma = noise_multiplier_for(cfg, plan, ledger, run_id)
    budget = min(cfg.effective_epsilon_budget, policy_budget)
    check = ledger.check_round(sigma, plan.sample_rate, plan.steps, budget)
    return RoundDecision(
        check.epsilon_before, check.epsilon_after, budget, plan=plan, noise_multiplier=sigma
    )


def delta_allows_record_release(delta: float, num_records: int) -> bool:
    """True when δ ≥ 1/N: releasing one whole record at random would meet that δ."""
    return delta * num_records >= 1
