"""A secure-aggregation run's numbers, planned before it starts and every round.

Both the launchers (to refuse a run that cannot work before any process starts)
and the server (which runs it) derive from the run config: the round's share
count k, threshold t and minimum of uploads m for a cohort of N; the quantisation
plan of a round; and the noise multiplier z, calibrated with the Skellam accountant.
"""

from __future__ import annotations

import math

from common.config import ConfigError, RunConfig
from common.privacy.client_level_plan import check_population
from common.secure_aggregation.distributed_dp import QuantisationPlan, plan_skellam_round
from common.secure_aggregation.protocol import threshold_for
from common.secure_aggregation.skellam_accounting import calibrate_skellam_noise_multiplier

MIN_COHORT = 2  # secure aggregation of one client would be its update


def round_sizes(cfg: RunConfig, cohort: int) -> tuple[int, int, int]:
    """(shares per node k, threshold t, minimum uploads m) for a cohort of N.

    Each node shares with the ⌊k/2⌋ nodes on either side of a ring, itself
    included (2⌊k/2⌋ + 1 in all), or with the whole cohort when that is no larger;
    t = ⌈fraction·shares⌉; m = max(t, ⌈secagg-min-contributors·N⌉).
    """
    if cohort < MIN_COHORT:
        raise ValueError(f"secure aggregation needs >= {MIN_COHORT} clients, got {cohort}")
    shares = min(cohort, 2 * (cfg.secagg_num_shares // 2) + 1)
    threshold = threshold_for(shares, cfg.secagg_reconstruction_threshold)
    minimum = max(threshold, math.ceil(cfg.secagg_min_contributors * cohort - 1e-9))
    return shares, threshold, minimum


def plan_for_round(cfg: RunConfig, dim: int, z: float, cohort: int) -> QuantisationPlan:
    """The round's public encoding for a cohort of N (:class:`ConfigError` naming
    ``secagg-modulus-range`` when the sum cannot fit)."""
    _, _, minimum = round_sizes(cfg, cohort)
    try:
        return plan_skellam_round(
            dim, cfg.client_clip_norm, z, cohort, minimum,
            int(math.log2(cfg.secagg_modulus_range)), cfg.secagg_clipping_range,
        )  # fmt: skip
    except ValueError as exc:
        raise ConfigError(f"run config key 'secagg-modulus-range': {exc}") from None


def expected_cohort(cfg: RunConfig, population: int) -> int:
    """The typical round's N: q·n, at least the protocol's minimum."""
    return max(MIN_COHORT, round(cfg.client_sampling_rate * population))


def secagg_noise_multiplier(cfg: RunConfig, population: int, dim: int) -> float:
    """z: the run's ``noise-multiplier``, or calibrated with the Skellam accountant so
    ``num-rounds`` rounds of the typical cohort at its minimum of uploads end at
    ``target-epsilon``; δ < 1/n is checked first.

    The sensitivities depend on the quantisation scale, which depends on z: two
    passes from a first guess."""
    check_population(cfg, population)
    cohort = expected_cohort(cfg, population)
    if cfg.noise_multiplier > 0:
        plan_for_round(cfg, dim, cfg.noise_multiplier, cohort)  # it must fit
        return cfg.noise_multiplier
    z = 1.0
    for _ in range(2):
        plan = plan_for_round(cfg, dim, z, cohort)
        z = calibrate_skellam_noise_multiplier(
            cfg.target_epsilon, cfg.delta, cfg.client_sampling_rate, cfg.num_rounds,
            plan.l1_sensitivity, plan.l2_sensitivity,
        )  # fmt: skip
    plan_for_round(cfg, dim, z, cohort)
    return z
