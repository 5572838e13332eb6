"""The server's white-box audit of a sample-level run: gradient canaries scored on
every client's round update (:mod:`common.audit.gradient_canaries`).

Black-box canaries are scored once, on the final model; this scores each canary on
each round's update of the client that holds it, which the server sees anyway. An
included canary moves its coordinate by −lr·C/B each step it is sampled; the score
is minus the owner's change on that coordinate, summed over the rounds, and the
one-run bound (Steinke, Nasr & Jagielski 2023) applies to it as to any score fixed
before the inclusion is known.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.audit.canaries import INCLUSION_PROBABILITY
from common.audit.gradient_canaries import (
    GRADIENT_CANARY_KIND,
    GRADIENT_SCORE,
    GradientCanaries,
    gradient_canaries,
)
from common.config import RunConfig
from server.audit.privacy_audit import GUESS_RULE, one_run_lower_bound, plot_scores

PLOT = "audit-scores-white-box.png"


class GradientCanaryScores:
    """Accumulates each gradient canary's score over the rounds of one run."""

    def __init__(self, cfg: RunConfig, dim: int) -> None:
        self.cfg, self.dim = cfg, dim
        self.plan: GradientCanaries | None = None
        self.scores = np.zeros(0)
        self.observed_rounds: set[int] = set()

    def start(self, partitions: int) -> None:
        """Draw the plan the clients draw: the same seed, count, d and partitions."""
        self.plan = gradient_canaries(
            self.cfg.seed, self.cfg.audit_canaries, self.dim, partitions
        )
        self.scores = np.zeros(len(self.plan.coordinates))

    def observe(
        self,
        server_round: int,
        partition: int,
        update: Sequence[np.ndarray],
        before: Sequence[np.ndarray],
    ) -> None:
        """Score the canaries ``partition`` owns on its update of this round."""
        if self.plan is None:
            raise RuntimeError("start() comes before observe()")
        owned = self.plan.owned_by(partition)
        if not len(owned):
            return
        after = np.concatenate([np.ravel(a) for a in update]).astype(np.float64)
        start = np.concatenate([np.ravel(a) for a in before]).astype(np.float64)
        if len(after) != self.dim or len(start) != self.dim:
            raise ValueError(f"an update of {len(after)} values, the model has {self.dim}")
        coords = self.plan.coordinates[owned]
        self.scores[owned] -= after[coords] - start[coords]
        self.observed_rounds.add(server_round)

    def block(self, out_dir: Path, reported_epsilon: float | None) -> dict[str, Any]:
        """The ``white_box`` part of the ``audit`` block; writes the score plot."""
        assert self.plan is not None
        bound = one_run_lower_bound(self.scores, self.plan.included, self.cfg.delta)
        plot_scores(
            self.scores,
            self.plan.included,
            "minus the owner's change on the canary's coordinate, over the rounds",
            f"white-box one-run audit, {bound.canaries} gradient canaries: "
            f"ε ≥ {bound.epsilon_lower_bound:.2f}",
            out_dir / PLOT,
        )
        return {
            **bound.to_dict(),
            "privacy_unit": "record",
            "canary": GRADIENT_CANARY_KIND,
            "inclusion_probability": INCLUSION_PROBABILITY,
            "included": int(self.plan.included.sum()),
            "score": GRADIENT_SCORE,
            "guess_rule": f"top and bottom r/2 scores for r in {GUESS_RULE}, union bound",
            "rounds_scored": len(self.observed_rounds),
            "reported_epsilon": reported_epsilon,
            "plot": PLOT,
        }
