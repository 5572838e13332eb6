"""Canary clients: the client-level half of ``audit = "one-run"`` (Andrew et al. 2024).

m virtual clients live on the server (they send no messages). Canary i has a random
unit direction u_i in parameter space and is included in the population with
probability ½ (the one-run design of Steinke, Nasr & Jagielski 2023, so their bound
applies as well as Andrew et al.'s estimate). An included canary joins every round's
Poisson cohort independently with probability q, like a real node, and then
contributes the update C·u_i (C the round's clip norm), which goes through the same
clip, sum and clip bit as a real update (:class:`ClientLevelAggregator`).

**The real clients' accounting is unchanged.** The canaries are extra clients beside
the n real ones: n (the population, δ < 1/n) and the denominator q·n count the real
nodes only, q and z are the run's, and the ledger records the same (z, q) per round.
Each canary is then protected exactly as a real client is (sensitivity C against the
same noise, Poisson sampled at q, over a denominator that does not depend on who
replied), so the audit measures the reported ε. What canaries do change is the model:
each round adds about q·m/2 clipped random directions (like extra noise), and with
adaptive clipping their "below C" bits push C down. An audit run is research only.

Directions and inclusion are the auditor's design and come from a generator seeded
from the run's ``seed``; the rounds a canary is sampled in come from the strategy's
cohort generator (OS entropy, as for real nodes), and are logged nowhere but in the
audit block's counts. Memory: m·d float32 directions.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.audit.canaries import INCLUSION_PROBABILITY, canary_count
from common.privacy.update_clipping import CLIP_MARGIN
from server.audit.one_shot_estimate import one_shot_estimate
from server.audit.privacy_audit import (
    AUDIT_PLOT,
    OneRunBound,
    audit_log_line,
    one_run_lower_bound,
    plot_scores,
)
from server.audit.white_box import (
    likelihood_ratio_scores,
    round_projection,
    white_box_block,
)

CANARY_STREAM = 0xCA7A  # separates the canaries' generator from others seeded by `seed`
SCORE = "cosine with final model change"
CANARY_KIND = "canary client: update C·u_i, u_i a random unit direction, sampled at q"
ESTIMATE_METHOD = (
    "andrew-et-al-2024 one-shot estimate: Gaussian fit of the included canaries' "
    "cosines vs the null N(0, 1/d)"
)


def _flatten(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


class CanaryClients:
    """m canary clients for one run: their directions, who is included, their updates."""

    def __init__(
        self, count: int, seed: int, sampling_rate: float, initial: Sequence[np.ndarray]
    ) -> None:
        count = canary_count(count, None)  # -1: the default number of canary clients
        if count < 2:
            raise ValueError(f"run config key 'audit-canaries': need >= 2, got {count}")
        if not 0 < sampling_rate <= 1:
            raise ValueError(f"sampling rate must be in (0, 1], got {sampling_rate}")
        self.shapes = [np.shape(a) for a in initial]
        self.dtypes = [np.asarray(a).dtype for a in initial]
        self.initial = _flatten(initial)
        self.sampling_rate = sampling_rate
        rng = np.random.default_rng([seed, CANARY_STREAM])
        directions = rng.standard_normal((count, self.initial.size), dtype=np.float32)
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        self.directions = directions
        self.included = rng.random(count) < INCLUSION_PROBABILITY
        self.times_sampled = np.zeros(count, dtype=np.int64)
        # white-box: each round's released update, projected on every direction
        self.projections: list[np.ndarray] = []
        self.noise_multipliers: list[float] = []

    @property
    def count(self) -> int:
        """m, included or not."""
        return len(self.included)

    @property
    def dimension(self) -> int:
        """d, the number of model parameters."""
        return self.initial.size

    def round_updates(
        self, clip_norm: float, rng: random.Random
    ) -> list[tuple[list[np.ndarray], bool]]:
        """This round's sampled canaries' updates C·u_i, each with the bit "at most C".

        Scaled to C·(1 − CLIP_MARGIN) so that the model-dtype update is at most C, as
        an honest client's clipped update is; the aggregator clips it again anyway.
        """
        updates = []
        for index in np.flatnonzero(self.included):
            if rng.random() < self.sampling_rate:
                self.times_sampled[index] += 1
                flat = self.directions[index].astype(np.float64)
                updates.append(
                    (self._unflatten(clip_norm * (1 - CLIP_MARGIN) * flat), True)
                )
        return updates

    def observe_round(
        self,
        mean_update: Sequence[np.ndarray],
        clip_norm: float,
        expected_cohort: float,
        noise_multiplier: float,
    ) -> None:
        """Keep this round's noised mean update projected on every u_i, as a server
        that stores each round's release can (:mod:`server.audit.white_box`)."""
        self.projections.append(
            round_projection(
                self.directions, _flatten(mean_update), clip_norm, expected_cohort,
                noise_multiplier,
            )
        )  # fmt: skip
        self.noise_multipliers.append(noise_multiplier)

    def white_box(self, delta: float, out_dir: Path | None) -> dict[str, Any]:
        """The bound on the rounds' likelihood-ratio scores, beside a Gaussian fit."""
        if not self.projections:
            return {}
        scores = likelihood_ratio_scores(
            np.stack(self.projections, axis=1), self.sampling_rate,
            self.noise_multipliers[-1],
        )  # fmt: skip
        return white_box_block(scores, self.included, delta, len(self.projections), out_dir)

    def _unflatten(self, flat: np.ndarray) -> list[np.ndarray]:
        arrays, start = [], 0
        for shape, dtype in zip(self.shapes, self.dtypes, strict=True):
            size = math.prod(shape)
            arrays.append(flat[start : start + size].reshape(shape).astype(dtype))
            start += size
        return arrays

    def cosines(self, final: Sequence[np.ndarray]) -> np.ndarray:
        """cos(final − initial, u_i) for every canary (0 if the model did not move)."""
        change = _flatten(final) - self.initial
        norm = float(np.linalg.norm(change))
        if norm == 0:
            return np.zeros(self.count)
        # float32 product: no float64 copy of the m×d directions (cosines ~1e-7 exact)
        unit = (change / norm).astype(np.float32)
        return (self.directions @ unit).astype(np.float64)

    def audit(
        self,
        final: Sequence[np.ndarray],
        delta: float,
        reported_epsilon: float | None,
        out_dir: Path | None = None,
    ) -> dict[str, Any]:
        """The ``audit`` block for summary.json; ``audit-scores.png`` in ``out_dir``."""
        scores = self.cosines(final)
        inside, outside = scores[self.included], scores[~self.included]
        # The Gaussian fit needs two cosines on each side; a tiny m may not have them.
        fits = min(inside.size, outside.size) >= 2
        estimate = (
            one_shot_estimate(inside, outside, self.dimension, delta) if fits else None
        )
        bound = one_run_lower_bound(scores.tolist(), self.included.tolist(), delta)
        fitted = estimate.to_dict() if estimate else {}  # an infinite ε becomes None
        block: dict[str, Any] = {
            **bound.to_dict(),  # method, canaries, guesses, correct, confidence, δ, bound
            "privacy_unit": "client",
            "estimate_method": ESTIMATE_METHOD,
            "canary": CANARY_KIND,
            "inclusion_probability": INCLUSION_PROBABILITY,
            "included": int(self.included.sum()),
            "canary_contributions": int(self.times_sampled.sum()),
            "included_never_sampled": int((self.times_sampled[self.included] == 0).sum()),
            "score": SCORE,
            "dimension": self.dimension,
            "reported_epsilon": reported_epsilon,
            "epsilon_estimate": fitted.get("epsilon"),
            "epsilon_estimate_empirical_null": fitted.get("epsilon_empirical_null"),
            "epsilon_estimate_infinite": estimate is not None
            and math.isinf(estimate.epsilon),
            "cosine_in": {"mean": fitted.get("mean_in"), "std": fitted.get("std_in")},
            "cosine_out": {"mean": fitted.get("mean_out"), "std": fitted.get("std_out")},
            "null_std": self.dimension**-0.5,
        }
        block["white_box"] = self.white_box(delta, out_dir)  # every round's release
        if out_dir is not None:
            block["plot"] = plot_scores(
                scores, self.included, SCORE, "client-level audit: canary cosines",
                out_dir / AUDIT_PLOT, null_std=self.dimension**-0.5,
            ).name  # fmt: skip
        return block


def canary_audit_line(block: dict[str, Any]) -> str:
    """The log line printed beside the reported ε: the bound, then the estimate."""
    fields = {f.name: block[f.name] for f in dataclasses.fields(OneRunBound)}
    line = audit_log_line(OneRunBound(**fields), block["reported_epsilon"], private=True)
    estimate = block["epsilon_estimate"]
    if block["epsilon_estimate_infinite"]:
        shown = "∞"
    elif estimate is None:
        shown = "none (fewer than 2 canaries included or excluded)"
    else:
        shown = f"{estimate:.3f}"
    white = block.get("white_box") or {}
    per_round = (
        f"; white-box (every round's update) ε ≥ {white['epsilon_lower_bound']:.3f}"
        if "epsilon_lower_bound" in white
        else ""
    )
    return (
        f"client-level {line}; one-shot estimate ε ≈ {shown} (Andrew et al. 2024)"
        f"{per_round}"
    )
