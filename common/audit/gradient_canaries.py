"""Gradient-space ("Dirac") canaries of the sample-level white-box audit.

The server sees every client's update every round, so the strongest realistic
auditor scores what it sees there, not only the final model (Steinke, Nasr &
Jagielski 2023, white-box one-run; Nasr et al. 2023, "Tight auditing"). A gradient
canary is a record whose clipped gradient is C·e_j, the clip norm on one coordinate
j of the flattened trainable parameters. Each canary belongs to one partition and
is included with probability ½; an included canary is Poisson-sampled at every
DP-SGD step like any record of its partition, and when sampled its gradient joins
the step's clipped sum before the noise. The server scores canary j by −Δ_j, its
owner's model change on coordinate j summed over the rounds (a sampled canary moves
that coordinate by −lr·C/B per step): the guarantee the accountant reports covers
every record, so it covers these.

Client and server derive the same plan from the seed here. The draws are the
auditor's design, not DP randomness: noise and Poisson masks still come from OS
entropy (:mod:`common.privacy.randomness`). Only simulations audit; a deployed node
refuses any audit (client/app.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from common.audit.canaries import INCLUSION_PROBABILITY, canary_count

if TYPE_CHECKING:
    from common.config import RunConfig

_GRADIENT_STREAM = 0xD1AC  # apart from the record canaries' draws of the same seed
GRADIENT_CANARY_KIND = (
    "gradient canaries: C times a unit vector on one model coordinate, Poisson-sampled "
    "with their partition's records at every step (direct DP-SGD)"
)
GRADIENT_SCORE = (
    "minus the owner's model change on the canary's coordinate, summed over rounds"
)


def white_box_applies(cfg: RunConfig) -> bool:
    """True when a run's sample-level audit also plants gradient canaries: the
    one-run audit of a private sample-level run on the ``direct`` gradient path
    (the path whose clipped sum privfed forms itself)."""
    return (
        cfg.audit == "one-run"
        and cfg.privacy_mode == "sample"
        and cfg.grad_sample_mode == "direct"
    )


@dataclass(frozen=True)
class GradientCanaries:
    """Which coordinates are canaries, whose they are, and whether they are in."""

    coordinates: np.ndarray  # distinct flat indices into the trainable parameters
    owners: np.ndarray  # the partition that holds each canary
    included: np.ndarray  # bool, probability ½ each

    def __post_init__(self) -> None:
        m = len(self.coordinates)
        if not (len(self.owners) == len(self.included) == m) or m < 2:
            raise ValueError("gradient canaries: >= 2, with one owner and flag each")
        if len(np.unique(self.coordinates)) != m:
            raise ValueError("gradient canaries must sit on distinct coordinates")

    def included_coordinates(self, partition: int) -> np.ndarray:
        """The coordinates of ``partition``'s included canaries (what it trains)."""
        return self.coordinates[(self.owners == partition) & self.included]

    def owned_by(self, partition: int) -> np.ndarray:
        """Indices (into this plan) of every canary ``partition`` owns, in or out."""
        return np.flatnonzero(self.owners == partition)


def gradient_canaries(
    seed: int, requested: int, dim: int, partitions: int
) -> GradientCanaries:
    """The run's gradient canaries: m = ``audit-canaries`` (auto: the smaller of
    1,000 and half the model's d coordinates), each on its own coordinate, owned by
    a partition drawn uniformly, included with probability ½."""
    m = canary_count(requested, dim)
    if not 2 <= m <= dim // 2:
        raise ValueError(
            f"run config key 'audit-canaries': the white-box audit plants one canary "
            f"per model coordinate and at most half of the model's {dim}, got {m}"
        )
    if partitions < 1:
        raise ValueError(f"gradient canaries need >= 1 partition, got {partitions}")
    rng = np.random.default_rng([seed, _GRADIENT_STREAM])
    coordinates = np.sort(rng.choice(dim, size=m, replace=False)).astype(np.int64)
    owners = rng.integers(0, partitions, size=m).astype(np.int64)
    included = rng.random(m) < INCLUSION_PROBABILITY
    return GradientCanaries(coordinates, owners, included)
