"""Client-level DP under secure aggregation: the server sees only the noised sum.

DP-FedAvg as :class:`~server.strategies.client_level.ClientLevelFedAvg` runs it —
Poisson cohorts, a fixed clip norm C, the noised sum divided by the expected cohort
q·n, FedAvgM on the result — except that the noise is the clients' (each adds its
share of Skellam noise, :mod:`common.secure_aggregation.distributed_dp`) and the
server only ever unmasks the sum (:mod:`server.secure_aggregation.round`).

Accounting (:class:`~server.checks.federation_ledger.DistributedLedger`):

- each client's share is calibrated so the sum carries noise multiplier z once the
  round's minimum m of uploads is in it; the ledger records the noise of the k
  uploads actually summed (k·V/m ≥ V), never more;
- ``epsilon`` is amplified by Poisson client sampling (q), as central DP-FedAvg's is:
  it holds against whoever sees the models but not who was sampled;
- the server knows each cohort, so against the server itself no amplification
  applies: ``epsilon_against_server`` composes, for each client, the unsampled
  Skellam releases of the rounds it contributed to, and reports the largest.
"""

from __future__ import annotations

import json
import secrets
import statistics
import time
from collections.abc import Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from common.config import RunConfig
from common.privacy.client_level_plan import ClientLevelSettings
from common.secure_aggregation.distributed_dp import QuantisationPlan, rotation_signs
from common.secure_aggregation.plan import (
    MIN_COHORT,
    plan_for_run,
    secagg_noise_multiplier,
    short_cohort_probability,
)
from common.secure_aggregation.protocol import Stage
from common.secure_aggregation.skellam_accounting import epsilon_from_rdp, round_rdp
from common.wire.reply_fields import CLIP_NORM_KEY, Status
from server.checks.federation_ledger import DistributedLedger
from server.results.client_outcomes import ClientOutcome, outcome_from_reply
from server.secure_aggregation.round import SecAggRound, round_layout
from server.strategies.client_level import ClientLevelFedAvg
from server.strategies.client_level_dp import (
    ClientLevelAggregator,
    RoundAggregate,
    poisson_cohort,
)
from server.strategies.private_fedavg import StrategyStateError, TrainStep

FAILED_ROUNDS_LIMIT = 3  # secure-aggregation rounds in a row that unmask nothing


class SecureAggregationError(RuntimeError):
    """Several rounds in a row could not be unmasked."""


class SecureAggregationFedAvg(ClientLevelFedAvg):
    """DP-FedAvg whose noise the clients add and whose sum only secure aggregation opens."""

    state_key = "secure_aggregation"  # its mechanism's state replaces the central one

    def __init__(
        self, cfg: RunConfig, ledger: DistributedLedger, dim: int, **kwargs: object
    ) -> None:
        super().__init__(cfg, ledger, **kwargs)  # type: ignore[arg-type]
        self.dim = dim
        self.distributed: DistributedLedger = ledger
        self.planned: QuantisationPlan | None = None  # one plan: m, s from q and n
        self.exposure: dict[int, np.ndarray] = {}  # node -> unsampled RDP it released
        self.epsilon_against_server: dict[int, float] = {}
        self.round_facts: dict[str, Any] = {}
        self.history_facts: list[dict[str, Any]] = []
        self.failed_in_a_row = 0
        self.stop_reason: str | None = None

    def initial_noise_multiplier(self) -> float:
        """Unknown before start_run: the Skellam calibration needs the population."""
        return self.cfg.noise_multiplier

    # -- hooks the round loop calls -------------------------------------------------
    def start_run(self, node_ids: Sequence[int]) -> None:
        """Fix n, calibrate z with the Skellam accountant, and plan the typical round."""
        population = len(set(node_ids))
        self.noise_multiplier = secagg_noise_multiplier(self.cfg, population, self.dim)
        settings = ClientLevelSettings.from_config(
            self.cfg, population, self.noise_multiplier
        )
        self.population = frozenset(node_ids)
        self.dp = ClientLevelAggregator(settings)
        self.planned = plan_for_run(self.cfg, self.dim, self.noise_multiplier, population)
        log(
            INFO,
            "[privfed] client-level DP under secure aggregation: n %d, q %.4g (expected "
            "cohort %.1f), z %.4f (Skellam), %d-bit sums, k %d shares, t %.2f·k, at "
            "least m = %d uploads every round (%.0f%% of the expected cohort; a round "
            "samples fewer, and releases nothing, with probability %.1f%%)",
            population, settings.sampling_rate, settings.expected_cohort,
            self.noise_multiplier, self.planned.modulus_bits, self.cfg.secagg_num_shares,
            self.cfg.secagg_reconstruction_threshold, self.planned.min_contributors,
            100 * self.cfg.secagg_min_contributors,
            100 * short_cohort_probability(
                self.cfg, population, self.planned.min_contributors
            ),
        )  # fmt: skip

    def budget_stop(self, server_round: int) -> str | None:
        """Why the run stops before ``server_round``: the budget, or a round already
        refused for it."""
        if self.stop_reason is not None:
            return self.stop_reason
        assert self.planned is not None, "start_run comes first"
        release = self.planned.release(
            self.planned.min_contributors, self.cfg.client_sampling_rate
        )
        return self._over_budget(server_round, release)

    def _over_budget(self, server_round: int, release: Any) -> str | None:
        check = self.distributed.check_release(release)
        if check.allowed:
            return None
        return (
            f"client-level ε budget: round {server_round} would bring ε from "
            f"{check.epsilon_before:.3f} to {check.epsilon_after:.3f} > {check.budget:.3f}"
        )

    def train_round(
        self, server_round: int, arrays: ArrayRecord, grid: Grid, timeout: float
    ) -> TrainStep:
        """One round of the protocol; the model moves only if the sum was unmasked."""
        if self.current_arrays is None:
            self.current_arrays = arrays  # FedAvgM's reference for its server step
        self.round_arrays = arrays
        present = sorted(self.population.intersection(grid.get_node_ids()))
        self.cohort = poisson_cohort(present, self.cfg.client_sampling_rate, self.rng)
        self.last_outcomes, self.last_round = [], None
        facts: dict[str, Any] = {"cohort": len(self.cohort), "unmasked": False}
        self.round_facts = facts
        assert self.planned is not None, "start_run comes first"
        plan = self.planned  # m and s are the run's, never the realised cohort's
        if len(self.cohort) < max(MIN_COHORT, plan.min_contributors):
            facts["failure"] = (
                f"a cohort of {len(self.cohort)} is below the run's minimum of "
                f"{max(MIN_COHORT, plan.min_contributors)} uploads (m, fixed from the "
                "expected cohort q·n); nothing was released"
            )
            log(WARNING, "round %d: %s", server_round, facts["failure"])
            return TrainStep(None, MetricRecord({}), 0, 0.0)
        cfg = self.cfg
        layout = round_layout(
            self.cohort, cfg, secrets.SystemRandom(), plan.min_contributors
        )
        over = self._over_budget(
            server_round, plan.release(layout.min_contributors, cfg.client_sampling_rate)
        )
        if over is not None:  # nothing sent, nothing released
            self.stop_reason = (
                f"{over}; round {server_round} sent nothing and the run stopped"
            )
            facts["failure"] = over
            return TrainStep(None, MetricRecord({}), 0, 0.0)
        seed = secrets.token_bytes(32)
        train_config = {"server-round": server_round, CLIP_NORM_KEY: plan.clip_norm}

        def train_content(node: int) -> RecordDict:
            config = {**train_config}
            if self.ledger_witness is not None:
                config.update(self.ledger_witness.annotation(node))
            return RecordDict({"arrays": arrays, "config": ConfigRecord(config)})

        protocol = SecAggRound(
            grid, server_round, layout, plan, seed, cfg.secagg_timeout, timeout,
            clock=time.monotonic,
        )  # fmt: skip
        result = protocol.run(train_content, admit=lambda r: self._admit(server_round, r))
        self.last_outcomes = self._outcomes(server_round, result)
        facts.update(self._protocol_facts(layout, plan, result))
        if result.total is None:
            return self._failed_round(server_round, result.failure or "unknown", result)
        self.failed_in_a_row = 0
        return self._unmasked_round(server_round, plan, seed, result, facts)

    # -- after the protocol ---------------------------------------------------------
    def _admit(self, server_round: int, reply: Message) -> ClientOutcome:
        """An upload's report, checked before its upload may join the sum."""
        outcome = outcome_from_reply(reply)
        if self.ledger_witness is not None:
            outcome = self.ledger_witness.check(server_round, [outcome])[0]
        return self._validator().validate_claims(server_round, outcome)

    def _outcomes(self, server_round: int, result: Any) -> list[ClientOutcome]:
        outcomes = [*result.admitted.values(), *result.excluded]
        outcomes += [outcome_from_reply(r) for r in [*result.answers, *result.errors]]
        for node, why in result.rejected.items():
            outcomes.append(ClientOutcome(node, Status.REJECTED, reason=why))
        for outcome in outcomes:
            self._log_outcome(server_round, outcome)
        return outcomes

    def _failed_round(self, server_round: int, why: str, result: Any) -> TrainStep:
        self.round_facts["failure"] = why
        self.failed_in_a_row += 1
        log(WARNING, "%s", why)
        if self.failed_in_a_row >= FAILED_ROUNDS_LIMIT:
            raise SecureAggregationError(
                f"{FAILED_ROUNDS_LIMIT} rounds in a row could not be unmasked; last: {why}"
            )
        return TrainStep(None, MetricRecord({}), len(self.cohort), result.exchange_seconds)

    def _unmasked_round(
        self,
        server_round: int,
        plan: QuantisationPlan,
        seed: bytes,
        result: Any,
        facts: dict[str, Any],
    ) -> TrainStep:
        assert self.round_arrays is not None
        keys = list(self.round_arrays.keys())
        current = self.round_arrays.to_numpy_ndarrays()
        signs = rotation_signs(seed, plan.padded_dim)
        summed = plan.decode(result.total, signs, current)
        settings = self._settings()
        mean = tuple(
            (s / settings.expected_cohort).astype(c.dtype)
            for s, c in zip(summed, current, strict=True)
        )
        contributors = result.contributors
        release = plan.release(len(contributors), self.cfg.client_sampling_rate)
        unsampled = round_rdp(release, amplified=False)
        for node in contributors:  # what the server, who knows the cohort, learned
            self.exposure[node] = self.exposure.get(node, 0) + unsampled
            self.epsilon_against_server[node] = epsilon_from_rdp(
                self.exposure[node], self.cfg.delta
            )
        facts["unmasked"] = True
        facts["epsilon_against_server"] = max(self.epsilon_against_server.values())
        epsilon = self.distributed.record_round(
            server_round, release, facts, self._ledger_facts()
        )
        facts["epsilon"] = epsilon
        self.history_facts.append(dict(facts))
        self.last_round = RoundAggregate(
            mean_update=mean, cohort=len(contributors), clip_norm=plan.clip_norm,
            next_clip_norm=plan.clip_norm, clipped_fraction=None,
            noised_below_fraction=None,
        )  # fmt: skip
        new_arrays = self.server_step(server_round, keys, current, mean)
        return TrainStep(
            new_arrays, MetricRecord({}), len(self.cohort), result.exchange_seconds
        )

    def _protocol_facts(
        self, layout: Any, plan: QuantisationPlan, result: Any
    ) -> dict[str, Any]:
        """What ``rounds.jsonl`` and the ledger record of the round's protocol."""
        up = [result.bytes_up[n] for n in sorted(result.bytes_up)]
        down = [result.bytes_down[n] for n in sorted(result.bytes_down)]
        k = len(result.contributors)
        return {
            "contributors": k,
            "dropped": result.dropped,
            "num_shares": len(next(iter(layout.neighbours.values()))),
            "threshold": layout.threshold,
            "min_contributors": layout.min_contributors,
            "modulus_bits": plan.modulus_bits,
            "scale": plan.scale,
            "padded_dim": plan.padded_dim,
            "coordinate_clip": plan.coordinate_clip,
            "noise_multiplier": plan.noise_multiplier,
            "effective_noise_multiplier": plan.effective_noise_multiplier(k) if k else None,
            "quantisation_inflation": plan.quantisation_inflation(),
            "modular_clipping_probability": plan.wrap_probability(max(k, 1)),
            "bytes_up_per_client_median": statistics.median(up) if up else None,
            "bytes_down_per_client_median": statistics.median(down) if down else None,
            "exchange_seconds": round(result.exchange_seconds, 4),
            "stage_seconds": dict(result.stage_seconds),
            "stage_bytes": {k: dict(v) for k, v in result.stage_bytes.items()},
            # what the consistency check adds: certificates and signatures in the
            # setup and share-keys messages, the consistency stage, unmask's signatures
            "consistency_check_bytes": dict(result.identity_bytes),
            "consistency_check_seconds": result.stage_seconds.get(
                Stage.CONSISTENCY.value, 0.0
            ),
            "certified_signers": len(result.signers),
            # the largest ε against the server a client reported from what it verified
            "epsilon_against_server_client_reported": max(
                result.client_epsilons.values(), default=None
            ),
        }

    def _ledger_facts(self) -> dict[str, Any]:
        settings = self._settings()
        return {
            "population": settings.population,
            "sampling_rate": settings.sampling_rate,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": settings.initial_clip_norm,
            "num_shares": self.cfg.secagg_num_shares,
            "reconstruction_threshold": self.cfg.secagg_reconstruction_threshold,
            "min_contributors": self.cfg.secagg_min_contributors,
            "modulus_range": self.cfg.secagg_modulus_range,
            "epsilon_against_server": max(
                self.epsilon_against_server.values(), default=0.0
            ),
            "epsilon_against_server_means": (
                "no amplification by sampling (the server knows each cohort): the "
                "unsampled Skellam releases of the rounds a client contributed to, "
                "for the client that contributed most"
            ),
        }

    # -- results ----------------------------------------------------------------------
    def round_privacy(self) -> dict[str, Any]:
        """The central block plus the round's secure-aggregation facts."""
        record = super().round_privacy()
        record["client_level"]["secure_aggregation"] = dict(self.round_facts)
        return record

    def summary_block(self) -> dict[str, Any]:
        """The central block plus the run's secure-aggregation summary."""
        block = super().summary_block()
        rounds = self.history_facts
        ups = [
            r["bytes_up_per_client_median"]
            for r in rounds
            if r["bytes_up_per_client_median"]
        ]
        block["secure_aggregation"] = {
            **self._ledger_facts(),
            "mechanism": "distributed Skellam (Agarwal, Kairouz & Liu 2021) under SecAgg+",
            "rounds_unmasked": len(rounds),
            "contributors_per_round": [r["contributors"] for r in rounds],
            "bytes_up_per_client_per_round_median": statistics.median(ups) if ups else None,
            "epsilon_against_server_client_reported": max(
                (r.get("epsilon_against_server_client_reported") or 0.0 for r in rounds),
                default=None,
            ),
        }
        return block

    # -- checkpoint and resume --------------------------------------------------------
    def mechanism_state(self) -> dict[str, Any]:
        """What a resume needs besides the model: n, z, the ledger, each client's
        exposure to the server (JSON)."""
        state = {
            "population": self._settings().population,
            "noise_multiplier": self.noise_multiplier,
            "ledger": self.distributed.to_dict(),
            "exposure": {str(n): list(map(float, v)) for n, v in self.exposure.items()},
        }
        return json.loads(json.dumps(state))  # a snapshot, not the live lists

    def load_mechanism_state(self, saved: Mapping[str, Any]) -> None:
        """Continue from a checkpoint; the ledger file may hold one more round (the
        one in flight), which is kept and charged to every client's exposure."""
        if int(saved["population"]) != self._settings().population:
            raise StrategyStateError(
                f"secure aggregation: {self._settings().population} nodes connected, "
                f"but the run was accounted for n = {saved['population']}"
            )
        extra = self.distributed.restore(saved["ledger"])
        self.exposure = {int(n): np.asarray(v) for n, v in saved["exposure"].items()}
        for release in extra:
            unsampled = round_rdp(release, amplified=False)
            for node in self.population:
                self.exposure[node] = self.exposure.get(node, 0) + unsampled
        self.epsilon_against_server = {
            n: epsilon_from_rdp(v, self.cfg.delta) for n, v in self.exposure.items()
        }
