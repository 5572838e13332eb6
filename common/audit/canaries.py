"""Canary records of the sample-level one-run audit, derived from the seed in one place.

Client and server both call :func:`canary_plan`: the client to train on the canaries
included in its partition, the server to score all of them after the last round.

The canaries are m records of the training pool, each given a wrong label drawn from
the seed (mislabelled records are the strongest black-box canaries: a model fits a
wrong label only by memorising that record). Each canary is included independently
with probability ½ and then trains, mislabelled, in the partition that holds its
record; an excluded canary is trained on by nobody. No client keeps a canary record
under its true label. The draws are the auditor's experiment design, known to the
auditor by construction; they are not DP randomness (noise and Poisson masks still
come from OS entropy, see :mod:`common.privacy.randomness`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from common.config import ConfigError

if TYPE_CHECKING:
    from common.config import RunConfig

INCLUSION_PROBABILITY = 0.5  # the one-run audit's design (Steinke et al. 2023)
CANARY_KIND = "training records relabelled to a wrong class drawn from the seed"
CANARY_SCORE = (
    "log-probability of the canary's wrong label under the final global model minus "
    "under the initial one (both known to the server)"
)
_AUDIT_STREAM = 0xA0D1  # keeps the audit's draws apart from other uses of the seed
# Privacy modes whose audit inserts canary records (client-level audits canary clients).
RECORD_CANARY_MODES = ("sample", "none")
# ``audit-canaries = -1`` (the default): the most canaries that fit every task, so that
# `audit = "one-run"` works on any dataset without a second key.
AUTO_CANARIES = -1
MAX_AUTO_CANARIES = 1000


def canary_count(requested: int, pool: int | None) -> int:
    """m for a run: ``requested``, or with -1 the smaller of 1,000 and half the
    training pool (``pool`` records; ``None`` for canary clients, which need no pool)."""
    if requested != AUTO_CANARIES:
        return requested
    return MAX_AUTO_CANARIES if pool is None else min(MAX_AUTO_CANARIES, pool // 2)


def inserts_canary_records(cfg: RunConfig) -> bool:
    """True when this run trains canary records into the clients' shards."""
    return cfg.audit == "one-run" and cfg.privacy_mode in RECORD_CANARY_MODES


@dataclass(frozen=True)
class CanaryPlan:
    """Which training-pool records are canaries, their wrong labels, and inclusion."""

    indices: np.ndarray  # sorted indices into the training pool
    labels: np.ndarray  # the wrong label each canary trains with
    true_labels: np.ndarray
    included: np.ndarray  # bool: trained on (probability ½ each)

    def __post_init__(self) -> None:
        m = len(self.indices)
        if not (len(self.labels) == len(self.true_labels) == len(self.included) == m):
            raise ValueError("canary indices, labels and inclusion differ in length")
        if m < 2 or np.any(np.diff(self.indices) <= 0):
            raise ValueError("canary indices must be >= 2 distinct, sorted records")
        if np.any(self.labels == self.true_labels):
            raise ValueError("every canary's label must differ from its true label")

    def split_partition(self, partition: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the partition without its canary records, its included canaries' indices).

        The second array indexes the training pool; train those records with
        :meth:`labels_of`, never with their true labels.
        """
        is_canary = np.isin(partition, self.indices)
        mine = partition[is_canary]
        position = np.searchsorted(self.indices, mine)
        return partition[~is_canary], np.sort(mine[self.included[position]])

    def labels_of(self, pool_indices: np.ndarray) -> np.ndarray:
        """The wrong labels of these canaries (indices into the training pool)."""
        position = np.searchsorted(self.indices, pool_indices)
        if np.any(
            self.indices[np.minimum(position, len(self.indices) - 1)] != pool_indices
        ):
            raise ValueError("labels_of: an index is not a canary")
        return self.labels[position]


def canary_plan(seed: int, m: int, y_train: np.ndarray, num_classes: int) -> CanaryPlan:
    """The run's m canaries over a training pool labelled ``y_train`` (m = -1: auto,
    see :func:`canary_count`).

    At most half the pool may be canaries, so the clients keep real data to learn from.
    """
    pool = len(y_train)
    m = canary_count(m, pool)
    if m > pool // 2:
        raise ConfigError(
            f"run config key 'audit-canaries': must be <= {pool // 2} (half of the "
            f"{pool} training records), got {m}"
        )
    rng = np.random.default_rng([seed, _AUDIT_STREAM])
    indices = np.sort(rng.choice(pool, size=m, replace=False))
    true_labels = np.asarray(y_train)[indices]
    shift = rng.integers(1, num_classes, size=m)  # 1..C-1: never the true class
    labels = ((true_labels + shift) % num_classes).astype(true_labels.dtype)
    included = rng.random(m) < INCLUSION_PROBABILITY
    return CanaryPlan(indices, labels, true_labels, included)
