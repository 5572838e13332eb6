"""Plan a client's DP-SGD round before it runs: sample rate, steps and σ.

The σ calibration serves every subsampled Gaussian mechanism of a run: DP-SGD's σ
here and DP-FedAvg's z (:mod:`common.privacy.client_level_plan`); the Skellam
mechanism of secure aggregation calibrates its own
(:func:`common.secure_aggregation.skellam_accounting.calibrate_skellam_noise_multiplier`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.privacy.accountants.registry import get_accountant


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


def plan_dp_sgd_round(num_examples: int, batch_size: int, local_epochs: int) -> RoundPlan:
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


def calibrate_gaussian_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str,
) -> float:
    """σ such that ``total_steps`` subsampled Gaussian steps at rate q end at or just
    below the target ε, by the named accountant.

    Opacus' ``get_noise_multiplier`` with its tolerance capped at 0.2 % of the target;
    for RDP without the opacus package init (see
    :mod:`common.privacy.accountants.opacus_rdp`). Remembered on this machine and
    checked by the accountant before reuse (:mod:`common.privacy.calibration_cache`).
    """
    from common.privacy.accountants.registry import ACCOUNTANTS
    from common.privacy.calibration_cache import remembered_sigma

    tolerance = min(0.01, 0.002 * target_epsilon)
    chosen = get_accountant(accountant)
    inputs = {
        "target_epsilon": target_epsilon, "delta": delta, "sample_rate": sample_rate,
        "steps": total_steps, "tolerance": tolerance, "accountant": accountant,
    }  # fmt: skip
    return remembered_sigma(
        inputs,
        ACCOUNTANTS.get(accountant),
        target_epsilon,
        calibrate=lambda: chosen.noise_multiplier(
            target_epsilon, delta, sample_rate, total_steps, tolerance
        ),
        epsilon_at=lambda sigma: chosen.epsilon(
            ((sigma, sample_rate, total_steps),), delta
        ),
    )
