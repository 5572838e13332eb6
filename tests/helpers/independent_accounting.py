"""Google's dp-accounting on a logged history: the independent check of every ε."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import dp_accounting


def dp_accounting_rdp(history: Iterable[Sequence[float]], delta: float) -> float:
    """ε of Poisson-subsampled Gaussian rounds (σ or z, q, count), by dp-accounting RDP."""
    accountant = dp_accounting.rdp.RdpAccountant()
    for sigma, q, count in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, int(count)))
    return accountant.get_epsilon(delta)
