"""DP-FedAvg's server side: Poisson cohorts, clipped sums, noise, adaptive clip norm.

McMahan et al. 2018 (DP-FedAvg) with the adaptive clipping of Andrew et al. 2021, as
TensorFlow Federated's ``DifferentiallyPrivateFactory.gaussian_adaptive`` composes it:

- every node joins a round independently with probability q (Poisson sampling: the
  amplification the accountant claims needs it; Flower's fixed-size
  ``random.sample`` earns none);
- the clipped updates are summed, N(0, (z_Δ·C)²) is added per coordinate, and the sum
  is divided by the *expected* cohort q·n, a constant: dividing by the number that
  replied would make one client's influence depend on the others;
- adaptive clipping moves C geometrically toward the target quantile γ of the update
  norms, C ← C·exp(−η(b̃ − γ)), where b̃ is the noised fraction of updates at most C
  (each bit centred at ½, so its sensitivity is ½, noised with σ_b). The update and the
  count are two Gaussian mechanisms on the same cohort; with
  z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) they compose to one with multiplier z, which is what
  the accountant sees.

All randomness (who is sampled, both noises) comes from OS entropy unless the run asks
for ``reproducible-noise`` (research only; the results then say it is not private).
"""

from __future__ import annotations

import math
import os
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.privacy.client_level_plan import ClientLevelSettings
from common.privacy.randomness import gaussian_noise
from common.privacy.update_clipping import clip_update


def poisson_cohort(node_ids: Sequence[int], rate: float, rng: random.Random) -> list[int]:
    """Each node independently with probability ``rate``; the cohort may be empty.

    With OS entropy (:class:`random.SystemRandom`) the n uniforms come from one
    ``os.urandom`` read instead of n, one system call each (0.1-0.3 s a round over
    100,000 nodes). Each is a 53-bit fraction, as ``SystemRandom.random`` makes it,
    so the draw has the same distribution; a seeded generator keeps its sequence.
    """
    if isinstance(rng, random.SystemRandom):
        words = np.frombuffer(os.urandom(8 * len(node_ids)), dtype=np.uint64)
        # The top 53 bits of each word over 2^53: exact in float64, uniform on [0, 1).
        uniforms = (words >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return [
            node
            for node, keep in zip(node_ids, (uniforms < rate).tolist(), strict=True)
            if keep
        ]
    return [node for node in node_ids if rng.random() < rate]


def sampling_rng(reproducible_seed: int | None = None) -> random.Random:
    """Cohort sampling: OS entropy, or a seeded generator for reproducible research."""
    if reproducible_seed is None:
        return secrets.SystemRandom()
    return random.Random(reproducible_seed)


@dataclass(frozen=True)
class RoundAggregate:
    """One round's noised average update and what the run records about it."""

    mean_update: tuple[np.ndarray, ...]
    cohort: int
    clip_norm: float  # C used this round
    next_clip_norm: float  # C for the next round (= clip_norm with fixed clipping)
    clipped_fraction: float | None  # exact, server-side diagnostic (not DP)
    noised_below_fraction: float | None  # b̃, adaptive clipping only (DP)


class ClientLevelAggregator:
    """Sums clipped updates, adds the noise, divides by q·n, adapts C."""

    def __init__(self, settings: ClientLevelSettings) -> None:
        self.settings = settings
        self.clip_norm = settings.initial_clip_norm

    def aggregate(
        self,
        shapes_like: Sequence[np.ndarray],
        updates: Sequence[tuple[Sequence[np.ndarray], bool]],
        generator: torch.Generator,
        canaries: Sequence[tuple[Sequence[np.ndarray], bool]] = (),
    ) -> RoundAggregate:
        """The noised mean of ``updates`` ((arrays, below-clip bit) per client).

        Every update is clipped again here to the round's C: a client that did not
        clip cannot raise the sensitivity. An empty cohort adds noise only.
        ``canaries`` (an audit's virtual clients) are clipped, summed and counted in
        the clip bit exactly alike, but left out of the cohort size and the clipped
        fraction that ``rounds.jsonl`` records; q·n stays the real nodes'.
        """
        s = self.settings
        c = self.clip_norm
        total = [np.zeros_like(a, dtype=np.float64) for a in shapes_like]
        clipped_count = 0
        below_centred = 0.0
        for index, (arrays, below) in enumerate([*updates, *canaries]):
            clipped = clip_update(arrays, c)
            if len(clipped.arrays) != len(total):
                raise ValueError("an update has a different number of arrays")
            for acc, part in zip(total, clipped.arrays, strict=True):
                if acc.shape != part.shape:
                    raise ValueError(f"update array of shape {part.shape}, not {acc.shape}")
                acc += part
            # The client's bit, unless its update arrived above C (it did not clip).
            was_below = below and clipped.below_clip
            clipped_count += int(not was_below and index < len(updates))
            below_centred += float(was_below) - 0.5
        std = s.update_noise_multiplier * c
        mean = tuple(
            (
                (acc + gaussian_noise(std, torch.from_numpy(acc), generator).numpy())
                / s.expected_cohort
            ).astype(like.dtype)
            for acc, like in zip(total, shapes_like, strict=True)
        )
        next_c, noised_below = c, None
        if s.clipping == "adaptive":
            noise = gaussian_noise(
                s.clipped_count_stddev, torch.zeros(1, dtype=torch.float64), generator
            ).item()
            noised_below = (below_centred + noise) / s.expected_cohort + 0.5
            next_c = c * math.exp(
                -s.clip_learning_rate * (noised_below - s.target_quantile)
            )
            self.clip_norm = next_c
        return RoundAggregate(
            mean_update=mean,
            cohort=len(updates),
            clip_norm=c,
            next_clip_norm=next_c,
            clipped_fraction=clipped_count / len(updates) if updates else None,
            noised_below_fraction=noised_below,
        )
