"""Coordinate-wise median [Yin et al., 2018]: Flower's FedMedian, unweighted.

Paper: https://arxiv.org/abs/1803.01498
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedMedian

from common.config import RunConfig


def build(cfg: RunConfig) -> FedAvg:
    """Flower's FedMedian (it reads no run key)."""
    return FedMedian()
