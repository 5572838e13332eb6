"""The client-level DP mechanism of a run (DP-FedAvg), planned before it starts.

Both the launcher (to refuse a bad run before any process starts) and the server
(which runs the mechanism) build it from the run config and the number of clients n.
See :mod:`server.strategies.client_level_dp` for how the server applies it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.config import ConfigError, RunConfig
from common.privacy.dp_sgd_plan import calibrate_gaussian_noise_multiplier


def client_noise_multiplier(cfg: RunConfig) -> float:
    """z: the run's noise-multiplier, or calibrated once so num-rounds rounds end at ε."""
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    return calibrate_gaussian_noise_multiplier(
        cfg.target_epsilon, cfg.delta, cfg.client_sampling_rate, cfg.num_rounds,
        cfg.accountant,
    )  # fmt: skip


@dataclass(frozen=True)
class ClientLevelSettings:
    """The mechanism of one run: q, n, z, and how C is chosen."""

    sampling_rate: float  # q
    population: int  # n: nodes connected when the run started
    noise_multiplier: float  # z, the combined multiplier the accountant sees
    clipping: str  # "fixed" or "adaptive"
    initial_clip_norm: float
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float = 0.0  # σ_b; only adaptive clipping uses it

    def __post_init__(self) -> None:
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling rate must be in (0, 1], got {self.sampling_rate}")
        if self.population < 1:
            raise ValueError(f"population must be >= 1, got {self.population}")
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise multiplier must be > 0, got {self.noise_multiplier}")
        if self.clipping == "adaptive" and not 2 * self.clipped_count_stddev > (
            self.noise_multiplier
        ):
            raise ConfigError(
                "run config key 'clipped-count-stddev': adaptive clipping splits z = "
                f"{self.noise_multiplier:.4g} between the update and the clipped count, "
                f"which needs 2·σ_b > z; got σ_b = {self.clipped_count_stddev:.4g} "
                "(raise it, or use more clients per round)"
            )

    @classmethod
    def from_config(
        cls, cfg: RunConfig, population: int, noise_multiplier: float
    ) -> ClientLevelSettings:
        """The run's settings; σ_b defaults to 1/20 of the expected cohort, as in TFF."""
        expected = cfg.client_sampling_rate * population
        stddev = cfg.clipped_count_stddev or expected / 20
        return cls(
            sampling_rate=cfg.client_sampling_rate,
            population=population,
            noise_multiplier=noise_multiplier,
            clipping=cfg.clipping,
            initial_clip_norm=cfg.client_clip_norm,
            target_quantile=cfg.target_clip_quantile,
            clip_learning_rate=cfg.clip_learning_rate,
            clipped_count_stddev=stddev if cfg.clipping == "adaptive" else 0.0,
        )

    @property
    def expected_cohort(self) -> float:
        """q·n: the fixed denominator of the noised average."""
        return self.sampling_rate * self.population

    @property
    def update_noise_multiplier(self) -> float:
        """z_Δ: z with fixed clipping; if adaptive, larger than z, so that the update's
        noise and the count's (2σ_b) compose to exactly z."""
        if self.clipping == "fixed":
            return self.noise_multiplier
        return (self.noise_multiplier**-2 - (2 * self.clipped_count_stddev) ** -2) ** -0.5


def plan_client_level(cfg: RunConfig, population: int) -> ClientLevelSettings:
    """The mechanism for ``cfg`` with ``population`` clients; a bad combination raises
    :class:`ConfigError` naming the key (δ ≥ 1/n, a count noise too small to split)."""
    check_population(cfg, population)
    return ClientLevelSettings.from_config(cfg, population, client_noise_multiplier(cfg))


def check_population(cfg: RunConfig, population: int) -> None:
    """δ must be below 1/n for the n clients (:class:`ConfigError` naming the key)."""
    if cfg.delta >= 1 / population:
        raise ConfigError(
            f"run config key 'delta': {cfg.delta:g} is not below 1/n = 1/{population} "
            f"for the {population} clients"
        )
