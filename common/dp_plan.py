"""Plan a client's DP-SGD round before it runs: sample rate, steps and σ."""

from __future__ import annotations

import math
from dataclasses import dataclass

from opacus.accountants.utils import get_noise_multiplier


@dataclass(frozen=True)
class RoundPlan:
    """Poisson sample rate q and the number of DP-SGD steps in one round."""

    sample_rate: float
    steps: int
    expected_batch_size: float

    def __post_init__(self) -> None:
        if not 0 < self.sample_rate <= 1 or self.steps < 1:
            raise ValueError(f"invalid round plan {self}")


def plan_round(num_examples: int, batch_size: int, local_epochs: int) -> RoundPlan:
    """q = 1/ceil(N/B) and ``local_epochs * int(1/q)`` steps, as Opacus would use."""
    if num_examples < 1:
        raise ValueError("a client needs at least one training example")
    batches = math.ceil(num_examples / batch_size)
    sample_rate = 1.0 / batches
    steps_per_epoch = int(1 / sample_rate)  # Opacus' UniformWithReplacementSampler
    return RoundPlan(
        sample_rate=sample_rate,
        steps=local_epochs * steps_per_epoch,
        expected_batch_size=num_examples * sample_rate,
    )


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str,
) -> float:
    """σ such that ``total_steps`` steps at rate q end at or just below the target ε."""
    tolerance = min(0.01, 0.002 * target_epsilon)
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
