"""Who shares secrets with whom in a round, and what a round produced.

SecAgg+'s graph (Bell et al. 2020) as Flower's ``SecAggPlusWorkflow`` builds it,
the threshold t (:func:`common.secure_aggregation.plan.round_sizes`), the run's
minimum m of uploads, and the record one round of
:class:`server.secure_aggregation.round.SecAggRound` fills in.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message

from common.config import RunConfig
from common.secure_aggregation.plan import round_sizes
from server.results.client_outcomes import ClientOutcome


@dataclass(frozen=True)
class Layout:
    """Who shares secrets with whom this round, t, and the least number of uploads."""

    neighbours: dict[int, tuple[int, ...]]  # node -> its neighbourhood, itself included
    threshold: int
    min_contributors: int

    @property
    def cohort(self) -> tuple[int, ...]:
        """Every node of the round."""
        return tuple(self.neighbours)


def round_layout(
    cohort: Sequence[int], cfg: RunConfig, rng: random.Random, minimum: int
) -> Layout:
    """SecAgg+'s graph: the cohort in a random ring, each node with the ⌊k/2⌋ nodes on
    either side (every node, if the cohort is not larger); t as
    :func:`common.secure_aggregation.plan.round_sizes` gives it; at least
    ``minimum`` uploads (the run plan's m), and never fewer than t."""
    nodes = list(cohort)
    if len(set(nodes)) != len(nodes):
        raise ValueError("a node is in the cohort twice")
    shares, threshold = round_sizes(cfg, len(nodes))
    rng.shuffle(nodes)
    size, half = len(nodes), shares // 2
    if shares == size:
        neighbours = {n: tuple(nodes) for n in nodes}
    else:
        neighbours = {
            n: tuple(nodes[(i + off) % size] for off in range(-half, half + 1))
            for i, n in enumerate(nodes)
        }
    return Layout(neighbours, threshold, max(threshold, minimum))


@dataclass
class SecAggResult:
    """What one round of the protocol produced."""

    total: np.ndarray | None  # the unmasked sum mod 2^b; None when the round failed
    failure: str | None
    uploads: dict[int, Message]  # the masked-update replies whose uploads are summed
    answers: list[Message]  # every other reply carrying a report (refusals, errors)
    errors: list[Message]  # replies that failed in Flower (no content)
    # uploads kept out of the sum: off-size (the reason), or refused by ``admit``
    rejected: dict[int, str] = field(default_factory=dict)
    excluded: list[ClientOutcome] = field(default_factory=list)
    admitted: dict[int, ClientOutcome] = field(default_factory=dict)  # uploads summed
    dropped: dict[str, list[int]] = field(default_factory=dict)  # stage -> nodes lost
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    exchange_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # each exchange
    # each exchange's bytes, summed over its nodes: {"down": ..., "up": ...}
    stage_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    # the identity layer's bytes (certificates, signatures, the consistency stage)
    identity_bytes: dict[str, int] = field(default_factory=dict)
    signers: tuple[int, ...] = ()  # uploaders whose signature on U checked
    # each revealing client's own ε against the server, from what it verified
    client_epsilons: dict[int, float] = field(default_factory=dict)

    @property
    def contributors(self) -> tuple[int, ...]:
        """Nodes whose uploads the sum holds (U)."""
        return tuple(sorted(self.uploads))
