"""A secure-aggregation run's numbers, planned before it starts and every round.

Both the launchers (to refuse a run that cannot work before any process starts)
and the server (which runs it) derive from the run config: the round's share
count k and threshold t for a cohort of N; the run's one quantisation plan, whose
minimum of uploads m and scale s depend on q and n only; and the noise multiplier
z, calibrated with the Skellam accountant.
"""

from __future__ import annotations

import math

from common.config import ConfigError, RunConfig
from common.privacy.client_level_plan import check_population
from common.secure_aggregation.distributed_dp import QuantisationPlan, plan_skellam_round
from common.secure_aggregation.protocol import threshold_for
from common.secure_aggregation.skellam_accounting import calibrate_skellam_noise_multiplier

MIN_COHORT = 2  # secure aggregation of one client would be its update


# The largest cohort a run plans its encoding for: the sum of that many uploads
# wraps mod 2^b with probability at most 10^-6, and a larger cohort has at most
# this probability of being sampled (wrap-around costs accuracy, never privacy).
LARGE_COHORT_TAIL = 1e-6


def round_sizes(cfg: RunConfig, cohort: int) -> tuple[int, int]:
    """(shares per node k, threshold t) for a realised cohort of N.

    Each node shares with the ⌊k/2⌋ nodes on either side of a ring, itself
    included (2⌊k/2⌋ + 1 in all), or with the whole cohort when that is no larger;
    t = ⌈fraction·shares⌉. The minimum of uploads m is the run's
    (:func:`public_minimum`), never the round's.
    """
    if cohort < MIN_COHORT:
        raise ValueError(f"secure aggregation needs >= {MIN_COHORT} clients, got {cohort}")
    shares = min(cohort, 2 * (cfg.secagg_num_shares // 2) + 1)
    return shares, threshold_for(shares, cfg.secagg_reconstruction_threshold)


def public_minimum(cfg: RunConfig, expected: int) -> int:
    """m for the expected cohort E = q·n, a public value: max(t for a cohort of E,
    ⌈secagg-min-contributors·E⌉). Each upload carries V/m of the noise."""
    _, threshold = round_sizes(cfg, expected)
    return max(threshold, math.ceil(cfg.secagg_min_contributors * expected - 1e-9))


def public_cohorts(cfg: RunConfig, population: int) -> tuple[int, int]:
    """(expected E, largest planned) cohort for Poisson sampling at q of n nodes.

    Both are functions of q and n alone. E = q·n (at least the protocol's minimum);
    the largest is the 1 − 10^-6 quantile of Binomial(n, q), what the encoding's
    wrap-around bound is planned for.
    """
    from scipy.stats import binom  # imported here: only the server and launchers plan

    q = cfg.client_sampling_rate
    expected = max(MIN_COHORT, round(q * population))
    largest = population if q >= 1 else int(binom.ppf(1 - LARGE_COHORT_TAIL, population, q))
    return expected, max(expected, min(population, largest))


def plan_for_run(cfg: RunConfig, dim: int, z: float, population: int) -> QuantisationPlan:
    """The run's one public encoding: the same m and scale s for every round.

    m and s are fixed from q and n, never from a round's realised cohort: were they
    chosen per round, their values would tell the number sampled, which one client's
    presence changes, and the amplified ε would not cover them. A round whose
    cohort falls below m releases nothing. Raises :class:`ConfigError` naming
    ``secagg-modulus-range`` when the largest planned sum cannot fit.
    """
    expected, largest = public_cohorts(cfg, population)
    try:
        return plan_skellam_round(
            dim, cfg.client_clip_norm, z, largest, public_minimum(cfg, expected),
            int(math.log2(cfg.secagg_modulus_range)), cfg.secagg_clipping_range,
        )  # fmt: skip
    except ValueError as exc:
        raise ConfigError(f"run config key 'secagg-modulus-range': {exc}") from None


def short_cohort_probability(cfg: RunConfig, population: int, minimum: int) -> float:
    """P(a Poisson cohort of n nodes at q has fewer than ``minimum``): the share of
    rounds that release nothing because fewer than m could upload."""
    from scipy.stats import binom

    return float(binom.cdf(minimum - 1, population, cfg.client_sampling_rate))


def expected_cohort(cfg: RunConfig, population: int) -> int:
    """The typical round's N: q·n, at least the protocol's minimum."""
    return public_cohorts(cfg, population)[0]


def secagg_noise_multiplier(cfg: RunConfig, population: int, dim: int) -> float:
    """z: the run's ``noise-multiplier``, or calibrated with the Skellam accountant so
    ``num-rounds`` rounds of the typical cohort at its minimum of uploads end at
    ``target-epsilon``; δ < 1/n is checked first.

    The sensitivities depend on the quantisation scale, which depends on z: two
    passes from a first guess."""
    check_population(cfg, population)
    if cfg.noise_multiplier > 0:
        plan_for_run(cfg, dim, cfg.noise_multiplier, population)  # it must fit
        return cfg.noise_multiplier
    z = 1.0
    for _ in range(2):
        plan = plan_for_run(cfg, dim, z, population)
        z = calibrate_skellam_noise_multiplier(
            cfg.target_epsilon, cfg.delta, cfg.client_sampling_rate, cfg.num_rounds,
            plan.l1_sensitivity, plan.l2_sensitivity,
        )  # fmt: skip
    plan_for_run(cfg, dim, z, population)
    return z
