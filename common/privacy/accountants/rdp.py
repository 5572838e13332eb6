"""Opacus' RDP accountant (Mironov 2017; the subsampled Gaussian of Mironov, Talwar &
Zhang 2019, https://arxiv.org/abs/1908.10530), without the opacus package init.

ε is Opacus' own arithmetic run from its analysis file (:mod:`.opacus_rdp`), with the
RDP of one step cached per (σ, q): reporting cumulative ε every round stays cheap.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from common.privacy.accountants.opacus_rdp import (
    RDP_ORDERS,
    compute_rdp,
    get_privacy_spent,
    rdp_noise_multiplier,
)

if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

    from common.privacy.accountants.registry import History

NAME = "opacus-rdp"


def make() -> IAccountant:
    """Opacus' ``RDPAccountant`` (this imports the opacus package)."""
    from opacus.accountants import RDPAccountant

    return RDPAccountant()


@lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one step at every Opacus default order (cached per (σ, q))."""
    vector = compute_rdp(sample_rate, noise_multiplier, 1, RDP_ORDERS)
    vector.setflags(write=False)
    return vector


def epsilon(history: History, delta: float) -> float:
    """``RDPAccountant.get_epsilon`` of ``history``: Opacus' compute_rdp is steps x
    (per-step RDP), summed over the history; the same arithmetic, per-order work
    done once per (σ, q)."""
    rdp = sum(_rdp_per_step(sigma, rate) * steps for sigma, rate, steps in history)
    eps, _ = get_privacy_spent(rdp, delta, RDP_ORDERS)
    return float(eps)


def noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    epsilon_tolerance: float,
) -> float:
    """``get_noise_multiplier(..., accountant="rdp")``, bisected without the package."""
    return float(
        rdp_noise_multiplier(target_epsilon, delta, sample_rate, steps, epsilon_tolerance)
    )
