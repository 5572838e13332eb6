"""Krum [Blanchard et al., 2017]: the one update closest to its n − f − 2 nearest
neighbours, f = ``krum-byzantine``.

Paper: https://arxiv.org/abs/1703.02757
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, Krum

from common.config import RunConfig


def build(cfg: RunConfig) -> FedAvg:
    """Flower's Krum with f = ``krum-byzantine``."""
    return Krum(num_malicious_nodes=cfg.krum_byzantine)
