"""Federated Averaging [McMahan et al., 2017]: the weighted mean of the updates.

Paper: https://arxiv.org/abs/1602.05629

The mean is :class:`server.strategies.private_fedavg.PrivateFedAvg`'s own (Flower's
FedAvgM with the run's server learning rate and momentum), so no rule object is
needed: the only rule client-level DP accounts for.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from common.config import RunConfig


def build(cfg: RunConfig) -> FedAvg | None:
    """``None``: the strategy averages by itself."""
    return None
