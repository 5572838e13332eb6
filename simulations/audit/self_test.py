"""The audit's self-test: privfed's own DP mechanisms, correct and with planted bugs,
audited white-box with Dirac canaries (``python -m simulations.audit --self-test``).

An audit that reports 0 on every correct run says nothing until it is shown to catch
a broken one. This runs the real mechanism code in-process, as the strongest
realistic adversary sees it (the server, which picks the model it sends and keeps
every round's update):

- **sample-level DP-SGD**: the client's :func:`client.training.dp_training.train_private`
  (per-sample clipping by :class:`PerSampleClipper`, noise by
  :func:`common.privacy.randomness.gaussian_noise`), one full-batch step per round
  (q = 1) on a linear model the server resets to 0 each round;
- **client-level DP-FedAvg**: the server's
  :class:`server.strategies.client_level_dp.ClientLevelAggregator` (clip, sum, noise,
  divide by q·n), every canary client in every round (q = 1).

Canary i owns coordinate i (a "Dirac" canary, Nasr et al. 2023): in round t it
contributes s_t·G·e_i, G = 10·C before clipping, with signs s_t = +1, −1, +1, …
(they sum to 0). Each canary is included with probability ½ (Steinke, Nasr &
Jagielski 2023). The score of canary i is Σ_t s_t · (released update)_i: the
matched filter, which for a correct mechanism is the optimal test (its ε is then
that of T Gaussian releases), and under which noise that repeats across rounds
cancels. Canaries run in blocks of at most ``BLOCK`` (independent runs of the
mechanism, pooled): each canary touches one block only, so the pooled run is
(ε, δ)-DP for each canary and the one-run bound applies to all of them.

The bugs are planted by wrapping the real functions (:mod:`unittest.mock`), so the
self-test audits privfed's code, not a copy. The auditor's design (inclusion,
signs) comes from ``seed``; the noise still comes from OS entropy.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from unittest import mock

import numpy as np
import torch
from torch import nn

from client.training.dp_training import train_private
from client.training.per_sample_grads import PerSampleClipper
from common.config import RunConfig
from common.privacy import randomness
from common.privacy.accountants.registry import get_accountant
from common.privacy.client_level_plan import ClientLevelSettings
from common.privacy.dp_sgd_plan import (
    calibrate_gaussian_noise_multiplier,
    plan_dp_sgd_round,
)
from common.privacy.update_clipping import ClippedUpdate, update_norm
from server.audit.fdp_one_run import GdpBound, gdp_lower_bound
from server.audit.privacy_audit import OneRunBound, one_run_lower_bound
from server.audit.white_box import gaussian_fit_epsilon
from server.strategies.client_level_dp import ClientLevelAggregator

BLOCK = 5000  # canaries (= coordinates) per run of the mechanism
CANARY_NORM = 10.0  # a canary's contribution before clipping, in units of C
CLIP = 1.0
_DESIGN_STREAM = 0x5E1F  # the self-test's design draws, apart from other seed uses

SAMPLE = "sample-level DP-SGD (client train_private)"
CLIENT = "client-level DP-FedAvg (server ClientLevelAggregator)"
MECHANISMS = (SAMPLE, CLIENT)
CORRECT = "correct"
HALF_NOISE = "noise x0.5"
NO_CLIPPING = "clipping skipped"
REUSED_NOISE = "noise drawn once, reused"
VARIANTS = (CORRECT, HALF_NOISE, NO_CLIPPING, REUSED_NOISE)
SCORE = "sum over rounds of s_t * (released update)_i, s_t = +1, -1, ..."


@dataclass(frozen=True)
class SelfTestSetup:
    """The workload: m canaries, T rounds (even), δ and the accountant that claims ε."""

    canaries: int = 20_000
    rounds: int = 2
    delta: float = 1e-5
    accountant: str = "rdp"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.canaries < 2:
            raise ValueError(f"--canaries must be >= 2, got {self.canaries}")
        if self.rounds < 2 or self.rounds % 2:
            raise ValueError(f"--rounds must be even and >= 2, got {self.rounds}")


@dataclass(frozen=True)
class SelfTestRow:
    """One mechanism × variant × claimed ε: the audit's bound and verdict."""

    mechanism: str
    variant: str
    claimed_epsilon: float
    accountant: str
    delta: float
    noise_multiplier: float
    bound: OneRunBound
    gdp: GdpBound  # f-DP audit of the claim "√T/σ-GDP"
    estimate: float  # Gaussian fit of the scores (not a bound); inf if separated
    scores: np.ndarray
    included: np.ndarray
    rounds: int

    @property
    def unit(self) -> str:
        """Whom ε protects: one canary record (DP-SGD) or one canary client."""
        return "record" if self.mechanism == SAMPLE else "client"

    @property
    def claimed_mu(self) -> float:
        """μ = √T/σ: T Gaussian releases at q = 1 are exactly μ-GDP."""
        return math.sqrt(self.rounds) / self.noise_multiplier

    @property
    def flagged(self) -> bool:
        """The (ε, δ) audit proves a violation: its 95 % lower bound exceeds ε."""
        return self.bound.epsilon_lower_bound > self.claimed_epsilon

    @property
    def gdp_flagged(self) -> bool:
        """The f-DP audit proves the run is not the √T/σ-GDP mechanism it claims."""
        return self.gdp.mu_lower_bound > self.claimed_mu

    @property
    def verdict(self) -> str:
        """What a reviewer reads: a planted bug must be flagged, the correct code not."""
        if self.variant == CORRECT:
            if self.flagged or self.gdp_flagged:
                return "FALSE ALARM"
            return "pass (bound <= ε, μ_lb <= μ)"
        if self.flagged:
            return "flagged (bound > ε)"
        if self.gdp_flagged:
            return "flagged (f-DP: μ_lb > μ)"
        if self.estimate > self.claimed_epsilon:
            return "missed by the bounds; estimate > ε"
        return "MISSED"


# -- planted bugs: wrappers around the real functions --------------------------------
_NOISE_TARGETS = {
    SAMPLE: "client.training.dp_training.gaussian_noise",
    CLIENT: "server.strategies.client_level_dp.gaussian_noise",
}
_Noise = Callable[[float, torch.Tensor, torch.Generator], torch.Tensor]


def _half_noise(real: _Noise) -> _Noise:
    return lambda std, like, generator: real(std, like, generator) * 0.5


def _reused_noise(real: _Noise) -> _Noise:
    drawn: dict[tuple[float, tuple[int, ...]], torch.Tensor] = {}

    def once(std: float, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        key = (std, tuple(like.shape))
        if key not in drawn:
            drawn[key] = real(std, like, generator)
        return drawn[key].clone()

    return once


def _unclipped(arrays: list[np.ndarray], clip_norm: float) -> ClippedUpdate:
    unchanged = tuple(np.asarray(a) for a in arrays)
    return ClippedUpdate(unchanged, update_norm(arrays), clip_norm)


@contextlib.contextmanager
def planted(mechanism: str, variant: str) -> Iterator[None]:
    """Run ``mechanism`` with ``variant``'s bug wrapped around the real code."""
    real = randomness.gaussian_noise
    if variant == CORRECT:
        yield
    elif variant in (HALF_NOISE, REUSED_NOISE):
        wrap = _half_noise if variant == HALF_NOISE else _reused_noise
        with mock.patch(_NOISE_TARGETS[mechanism], wrap(real)):
            yield
    elif variant == NO_CLIPPING and mechanism == SAMPLE:
        clipped_sums = PerSampleClipper.clipped_sums
        with mock.patch.object(
            PerSampleClipper, "clipped_sums",
            lambda self, loss, _c: clipped_sums(self, loss, math.inf),
        ):  # fmt: skip
            yield
    elif variant == NO_CLIPPING:
        with mock.patch("server.strategies.client_level_dp.clip_update", _unclipped):
            yield
    else:
        raise ValueError(f"unknown variant {variant!r}")


# -- one block of canaries through each mechanism ------------------------------------
def _signs(rounds: int) -> list[float]:
    return [1.0 if t % 2 == 0 else -1.0 for t in range(rounds)]


def _sample_level_block(
    included: np.ndarray, setup: SelfTestSetup, sigma: float
) -> np.ndarray:
    """Included canary i is a record x = G·√2·e_i whose label flips with s_t: at the
    zero model its gradient is s_t·G·(e_0 − e_1)/√2 ⊗ e_i, norm G."""
    m, inside = len(included), np.flatnonzero(included)
    n = max(len(inside), 2)  # a 2-record floor keeps the plan valid for tiny blocks
    x = torch.zeros(n, m)
    x[np.arange(len(inside)), torch.from_numpy(inside)] = CANARY_NORM * CLIP * math.sqrt(2)
    cfg = RunConfig(
        max_grad_norm=CLIP, learning_rate=1.0, momentum=0.0, batch_size=n,
        local_epochs=1, grad_sample_mode="direct", accountant=setup.accountant,
        delta=setup.delta,
    )  # fmt: skip
    plan = plan_dp_sgd_round(n, n, 1)  # q = 1: every record, one step per round
    scores = np.zeros(m)
    for sign in _signs(setup.rounds):
        model = nn.Linear(m, 2, bias=False)
        nn.init.zeros_(model.weight)  # the server sends the zero model every round
        y = torch.full((n,), 0 if sign > 0 else 1, dtype=torch.long)
        train_private(model, x, y, cfg, plan, sigma, randomness.round_generator())
        update = model.weight.detach().double().numpy()  # minus the zero model
        scores += sign * (update[0] - update[1])
    return scores


def _client_level_block(
    included: np.ndarray, setup: SelfTestSetup, sigma: float
) -> np.ndarray:
    """Included canary client i sends s_t·G·e_i; q = 1 and n = m (fixed divisor)."""
    m, inside = len(included), np.flatnonzero(included)
    settings = ClientLevelSettings(1.0, m, sigma, "fixed", CLIP)
    aggregator = ClientLevelAggregator(settings)
    like = [np.zeros(m, np.float32)]
    scores = np.zeros(m)
    for sign in _signs(setup.rounds):
        rows = np.zeros((len(inside), m), np.float32)
        rows[np.arange(len(inside)), inside] = sign * CANARY_NORM * CLIP
        updates = [([row], True) for row in rows]
        agg = aggregator.aggregate(like, updates, randomness.round_generator())
        scores += sign * agg.mean_update[0].astype(np.float64)
    return scores


_BLOCKS = {SAMPLE: _sample_level_block, CLIENT: _client_level_block}


# -- the audit ----------------------------------------------------------------------
def design(setup: SelfTestSetup) -> np.ndarray:
    """Which canaries are included (probability ½ each): the auditor's, from the seed."""
    rng = np.random.default_rng([setup.seed, _DESIGN_STREAM])
    return rng.random(setup.canaries) < 0.5


def noise_multiplier(setup: SelfTestSetup, epsilon: float) -> tuple[float, float]:
    """σ for T rounds at q = 1 by the accountant, and the ε it claims for them."""
    sigma = calibrate_gaussian_noise_multiplier(
        epsilon, setup.delta, 1.0, setup.rounds, setup.accountant
    )
    claimed = get_accountant(setup.accountant).epsilon(
        ((sigma, 1.0, setup.rounds),), setup.delta
    )
    return sigma, claimed


def audit_variant(
    mechanism: str,
    variant: str,
    epsilon: float,
    setup: SelfTestSetup,
    calibrated: tuple[float, float] | None = None,
) -> SelfTestRow:
    """Run ``mechanism`` (with ``variant``'s bug) at the σ for ``epsilon``; audit it."""
    sigma, claimed = calibrated or noise_multiplier(setup, epsilon)
    included = design(setup)
    scores = np.empty(setup.canaries)
    with planted(mechanism, variant):
        for start in range(0, setup.canaries, BLOCK):
            block = slice(start, start + BLOCK)
            scores[block] = _BLOCKS[mechanism](included[block], setup, sigma)
    bound = one_run_lower_bound(scores, included, setup.delta)
    return SelfTestRow(
        mechanism=mechanism, variant=variant, claimed_epsilon=claimed,
        accountant=get_accountant(setup.accountant).NAME, delta=setup.delta,
        noise_multiplier=sigma, bound=bound,
        gdp=gdp_lower_bound(scores, included, setup.delta),
        estimate=gaussian_fit_epsilon(scores, included, setup.delta),
        scores=scores, included=included, rounds=setup.rounds,
    )  # fmt: skip


def run_self_test(
    setup: SelfTestSetup,
    epsilons: tuple[float, ...],
    mechanisms: tuple[str, ...] = MECHANISMS,
    variants: tuple[str, ...] = VARIANTS,
    progress: Callable[[SelfTestRow], None] | None = None,
) -> list[SelfTestRow]:
    """Every mechanism × variant × ε, σ calibrated once per ε."""
    rows = []
    for epsilon in epsilons:
        calibrated = noise_multiplier(setup, epsilon)
        for mechanism in mechanisms:
            for variant in variants:
                row = audit_variant(mechanism, variant, epsilon, setup, calibrated)
                rows.append(row)
                if progress is not None:
                    progress(row)
    return rows
