"""Plan a client's DP-SGD round before it runs: sample rate, steps and σ."""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.privacy.accountants.opacus_rdp import rdp_noise_multiplier


@dataclass(frozen=True)
class RoundPlan:
    """The Poisson rate the sampler uses, the rate accounted, and the steps of a round.

    Opacus samples at ``sampler_rate`` = 1/⌈N/B⌉ but accounts at 1/len(loader),
    where len(loader) = int(1/sampler_rate) can round down by one (e.g. N = 27,000,
    B = 32: it samples at 1/844 and accounts 843 steps at 1/843). The accounted
    ``sample_rate`` is then slightly larger than the real one, so ε is a valid,
    marginally conservative bound, and it is the rate Opacus records.
    """

    sample_rate: float
    sampler_rate: float
    steps: int
    expected_batch_size: int  # int(N * sample_rate): Opacus' divisor of the noised sum

    def __post_init__(self) -> None:
        if not 0 < self.sampler_rate <= self.sample_rate <= 1 or self.steps < 1:
            raise ValueError(f"invalid round plan {self}")
        if self.expected_batch_size < 1:
            raise ValueError(
                f"run config key 'batch-size': the expected Poisson batch rounds to "
                f"{self.expected_batch_size} records (Opacus would divide by zero); "
                "use batch-size >= 2"
            )


def plan_round(num_examples: int, batch_size: int, local_epochs: int) -> RoundPlan:
    """The round Opacus' ``make_private(poisson_sampling=True)`` would run."""
    if num_examples < 1:
        raise ValueError("a client needs at least one training example")
    batches = math.ceil(num_examples / batch_size)
    sampler_rate = 1.0 / batches
    steps_per_epoch = int(1 / sampler_rate)  # len() of Opacus' Poisson sampler
    sample_rate = 1.0 / steps_per_epoch
    return RoundPlan(
        sample_rate=sample_rate,
        sampler_rate=sampler_rate,
        steps=local_epochs * steps_per_epoch,
        # Opacus' make_private: int(len(dataset) * sample_rate) with the accounted rate
        expected_batch_size=int(num_examples * sample_rate),
    )


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str,
) -> float:
    """σ such that ``total_steps`` steps at rate q end at or just below the target ε.

    Opacus' ``get_noise_multiplier``; for RDP without the opacus package init
    (see :mod:`common.privacy.accountants.opacus_rdp`).
    """
    tolerance = min(0.01, 0.002 * target_epsilon)
    if accountant == "rdp":
        return float(
            rdp_noise_multiplier(target_epsilon, delta, sample_rate, total_steps, tolerance)
        )
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=total_steps,
            accountant=accountant,
            epsilon_tolerance=tolerance,
        )
    )
