"""Opacus' PRV accountant (Gopi, Lee & Wutschitz 2021, https://arxiv.org/abs/2106.02848).

Unlike RDP it needs the opacus package (and scipy), so only a run that names it
imports them. Whole histories are cached: the same ledger is reported every round.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

    from common.privacy.accountants.registry import History

NAME = "opacus-prv"


def make() -> IAccountant:
    """Opacus' ``PRVAccountant``."""
    from opacus.accountants import PRVAccountant

    return PRVAccountant()


@lru_cache(maxsize=256)
def _epsilon(history: History, delta: float) -> float:
    accountant = make()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def epsilon(history: History, delta: float) -> float:
    """``PRVAccountant.get_epsilon`` of ``history``."""
    return _epsilon(history, delta)


def noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    epsilon_tolerance: float,
) -> float:
    """Opacus' ``get_noise_multiplier(..., accountant="prv")``."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="prv",
            epsilon_tolerance=epsilon_tolerance,
        )
    )
