"""Coordinate-wise trimmed mean [Yin et al., 2018]: Flower's FedTrimmedAvg, unweighted.

Paper: https://arxiv.org/abs/1803.01498

``trim-fraction`` of the values is cut from each tail of every coordinate.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedTrimmedAvg

from common.config import RunConfig


def build(cfg: RunConfig) -> FedAvg:
    """Flower's FedTrimmedAvg with β = ``trim-fraction``."""
    return FedTrimmedAvg(beta=cfg.trim_fraction)
