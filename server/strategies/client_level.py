"""DP-FedAvg as a strategy: Poisson cohorts in, one noised average out, ledger first.

Reply parsing, refusals and failures are :class:`PrivateFedAvg`'s; the mechanism is
:mod:`server.strategies.client_level_dp`; the server optimiser (FedAvgM's learning rate and
momentum) is Flower's, applied to the noised average as post-processing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvgM
from flwr.supercore import log

from common.config import RunConfig
from common.privacy.client_level_plan import (
    ClientLevelSettings,
    client_noise_multiplier,
    plan_client_level,
)
from common.privacy.randomness import reproducible_seed, round_generator
from common.wire.reply_fields import CLIP_NORM_KEY, Status
from server.checks.federation_ledger import LEDGER_FILE, FederationLedger
from server.checks.update_validation import UpdateValidator
from server.results.client_outcomes import ClientOutcome
from server.strategies.client_level_dp import (
    ClientLevelAggregator,
    RoundAggregate,
    poisson_cohort,
    sampling_rng,
)
from server.strategies.private_fedavg import (
    WEIGHT_KEY,
    PrivateFedAvg,
    StrategyStateError,
    in_partition_order,
)

if TYPE_CHECKING:
    from server.audit.canary_clients import CanaryClients

SERVER_PARTITION = -2  # the server's "partition" in reproducible-noise seeds


class ClientLevelFedAvg(PrivateFedAvg):
    """Client-level DP-FedAvg with fixed or adaptive clipping and a federation ledger."""

    state_key = "client_level"  # the mechanism's section of the checkpointed state

    def __init__(self, cfg: RunConfig, ledger: FederationLedger, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.cfg = cfg
        self.ledger = ledger
        self.noise_multiplier = self.initial_noise_multiplier()
        replay = cfg.seed if cfg.reproducible_noise else None
        self.rng = sampling_rng(replay)
        self.dp: ClientLevelAggregator | None = None
        self.last_round: RoundAggregate | None = None
        self.cohort: list[int] = []
        self.population: frozenset[int] = frozenset()
        self.canaries: CanaryClients | None = None  # audit = "one-run" only

    def initial_noise_multiplier(self) -> float:
        """z, calibrated for the Gaussian mechanism the server runs."""
        return client_noise_multiplier(self.cfg)

    # -- hooks the round loop calls -------------------------------------------------
    def start_run(self, node_ids: Sequence[int]) -> None:
        """Fix the population (the nodes connected at the start), n, and the mechanism;
        check δ < 1/n."""
        settings = plan_client_level(self.cfg, len(set(node_ids)))
        self.population = frozenset(node_ids)
        self.dp = ClientLevelAggregator(settings)
        log(
            INFO,
            "[privfed] client-level DP: n %d, q %.4g (expected cohort %.1f), z %.4f "
            "(update %.4f), %s clipping from C %.4g",
            settings.population, settings.sampling_rate, settings.expected_cohort,
            settings.noise_multiplier, settings.update_noise_multiplier,
            settings.clipping, settings.initial_clip_norm,
        )  # fmt: skip

    def budget_stop(self, server_round: int) -> str | None:
        """Why the run must stop before ``server_round`` (the budget), or ``None``."""
        check = self.ledger.check(self.noise_multiplier, self.cfg.client_sampling_rate)
        if check.allowed:
            return None
        return (
            f"client-level ε budget: round {server_round} would bring ε from "
            f"{check.epsilon_before:.3f} to {check.epsilon_after:.3f} > {check.budget:.3f}"
        )

    def round_privacy(self) -> dict[str, Any]:
        """The round's client-level facts for ``rounds.jsonl`` (ε is cumulative)."""
        eps = self.ledger.epsilon()
        agg = self.last_round
        settings = self._settings()
        return {
            "max_epsilon": eps if math.isfinite(eps) else None,
            "max_epsilon_infinite": False,
            "accountant": self.ledger.accountant_name,
            "delta": self.cfg.delta,
            "privacy_unit": "client",
            "client_level": {
                "cohort_size": agg.cohort if agg else None,
                "expected_cohort": settings.expected_cohort,
                "clip_norm": agg.clip_norm if agg else None,
                "next_clip_norm": agg.next_clip_norm if agg else None,
                "clipped_fraction": agg.clipped_fraction if agg else None,
                "noised_below_fraction": agg.noised_below_fraction if agg else None,
                "noise_multiplier": settings.noise_multiplier,
                "sampling_rate": settings.sampling_rate,
            },
        }

    def summary_block(self) -> dict[str, Any]:
        """``summary.json``'s client-level guarantee: one block, from the ledger."""
        settings = self._settings()
        eps = self.ledger.epsilon()
        return {
            "privacy_mode": "client",
            "privacy_unit": "client",
            "accountant": self.ledger.accountant_name,
            "delta": self.cfg.delta,
            "epsilon": eps if math.isfinite(eps) else None,
            "epsilon_budget": self.ledger.budget if math.isfinite(self.ledger.budget)
            else None,
            "history": self.ledger.history,
            "rounds": self.ledger.rounds_recorded,
            "population": settings.population,
            "sampling_rate": settings.sampling_rate,
            "expected_cohort": settings.expected_cohort,
            "noise_multiplier": settings.noise_multiplier,
            "update_noise_multiplier": settings.update_noise_multiplier,
            "clipped_count_stddev": settings.clipped_count_stddev or None,
            "clipping": settings.clipping,
            "initial_clip_norm": settings.initial_clip_norm,
            "final_clip_norm": self._aggregator().clip_norm,
            "ledger_file": self.ledger.path.name,
        }  # fmt: skip

    def audit_block(self, final_arrays: ArrayRecord) -> dict[str, Any] | None:
        """``summary.json``'s client-level ``audit`` block (and ``audit-scores.png``
        beside the ledger), or ``None`` when the run has no canaries."""
        if self.canaries is None:
            return None
        eps = self.ledger.epsilon()
        return self.canaries.audit(
            final_arrays.to_numpy_ndarrays(),
            self.cfg.delta,
            eps if math.isfinite(eps) else None,
            self.ledger.path.parent,
        )

    # -- Flower strategy ------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Instruct a Poisson cohort (possibly empty) with the round's clip norm."""
        if self.current_arrays is None:
            self.current_arrays = arrays  # FedAvgM's reference for its server step
        if self.cfg.audit == "one-run" and self.canaries is None:  # at the initial model
            from server.audit.canary_clients import CanaryClients  # scipy: audits only

            self.canaries = CanaryClients(
                self.cfg.audit_canaries, self.cfg.seed, self.cfg.client_sampling_rate,
                arrays.to_numpy_ndarrays(),
            )  # fmt: skip
        self.round_arrays = arrays
        # Only the n nodes of the start: q·n and δ < 1/n were fixed for them. A node
        # that joins later waits for the next run.
        present = sorted(self.population.intersection(grid.get_node_ids()))
        self.cohort = poisson_cohort(present, self.cfg.client_sampling_rate, self.rng)
        config["server-round"] = server_round
        config[CLIP_NORM_KEY] = float(self._aggregator().clip_norm)
        record = RecordDict({"arrays": arrays, "config": config})
        messages = self._construct_messages(record, self.cohort, MessageType.TRAIN)
        if self.ledger_witness is None:
            return messages
        return self.ledger_witness.annotate(messages, self.configrecord_key)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Noised mean of the clipped updates over q·n, ledger written, then FedAvgM."""
        assert self.round_arrays is not None, "configure_train comes first"
        keys = list(self.round_arrays.keys())
        current = self.round_arrays.to_numpy_ndarrays()
        clip_norm = self._aggregator().clip_norm  # the C this round's cohort was sent
        replies, parsed = in_partition_order(replies)
        if self.ledger_witness is not None:  # a reply behind the witness: an error
            parsed = self.ledger_witness.check(server_round, parsed)
        updates: list[tuple[list[np.ndarray], bool]] = []
        outcomes: list[ClientOutcome] = []
        counted: set[int] = set()
        for reply, outcome in zip(replies, parsed, strict=True):
            if outcome.status is Status.TRAINED and (
                outcome.node_id not in self.cohort or outcome.node_id in counted
            ):  # Flower's link state prevents both; one update per sampled node
                outcome = dataclasses.replace(
                    outcome, status=Status.REJECTED,
                    reason="client-level update rejected: not one reply per sampled node",
                )  # fmt: skip
            if outcome.status is Status.TRAINED:
                counted.add(outcome.node_id)
                outcome, update = self._validator().validate(
                    server_round, reply, outcome, self.round_arrays, clip_norm
                )
                if update is not None:
                    updates.append((update, bool(outcome.below_clip)))
            outcomes.append(outcome)
            self._log_outcome(server_round, outcome)
        self.last_outcomes = outcomes
        replay = (
            reproducible_seed(self.cfg.seed, SERVER_PARTITION, server_round)
            if self.cfg.reproducible_noise
            else None
        )
        canaries = (
            self.canaries.round_updates(clip_norm, self.rng)
            if self.canaries is not None
            else []
        )
        agg = self._aggregator().aggregate(
            current, updates, round_generator(replay), canaries=canaries
        )
        self.last_round = agg
        if self.canaries is not None:  # audit: keep the round's release (white-box)
            settings = self._settings()
            self.canaries.observe_round(
                agg.mean_update, agg.clip_norm, settings.expected_cohort,
                settings.update_noise_multiplier,
            )  # fmt: skip
        self.ledger.record_round(
            server_round,
            self.noise_multiplier,
            self.cfg.client_sampling_rate,
            {"clip_norm": agg.next_clip_norm, "population": self._settings().population},
        )
        return self.server_step(server_round, keys, current, agg.mean_update), MetricRecord(
            {}
        )

    def server_step(
        self,
        server_round: int,
        keys: list[str],
        current: Sequence[np.ndarray],
        mean_update: Sequence[np.ndarray],
    ) -> ArrayRecord | None:
        """FedAvgM's step on the noised mean update (post-processing)."""
        target = ArrayRecord(
            {
                key: Array(np.asarray(now + change, dtype=now.dtype))
                for key, now, change in zip(keys, current, mean_update, strict=True)
            }
        )
        average = Message(
            RecordDict({"arrays": target, "weight": MetricRecord({WEIGHT_KEY: 1.0})}),
            dst_node_id=0,
            message_type=MessageType.TRAIN,
        )
        new_arrays, _ = FedAvgM.aggregate_train(self, server_round, [average])
        return new_arrays

    # -- checkpoint and resume --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """:class:`PrivateFedAvg`'s state plus the mechanism's (once ``start_run`` has
        fixed it) under :attr:`state_key`."""
        state = super().state_dict()
        if self.dp is not None:
            state[self.state_key] = self.mechanism_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output; the mechanism's state must be
        there, and fit the population this run started with."""
        super().load_state_dict(state)
        saved = state.get(self.state_key)
        if saved is None or self.dp is None:
            raise StrategyStateError(
                f"no {self.state_key.replace('_', '-')} state for this run's privacy "
                f"mode (the saved state holds {sorted(state)})"
            )
        self.load_mechanism_state(saved)

    def mechanism_state(self) -> dict[str, Any]:
        """What a resume needs of the mechanism: C, n, z and the federation ledger."""
        return {
            "clip_norm": self._aggregator().clip_norm,
            "population": self._settings().population,
            "noise_multiplier": self.noise_multiplier,
            "ledger": self.ledger.ledger.to_dict(),
        }

    def load_mechanism_state(self, saved: Mapping[str, Any]) -> None:
        """Keep the checkpoint's clip norm, with the same n; continue the ledger
        file, which must extend the checkpoint's copy (a round beyond it, in flight
        when the server stopped, stays spent and its rerun is recorded again)."""
        population = self._settings().population
        if population != int(saved["population"]):
            raise StrategyStateError(
                f"client-level DP: {population} nodes connected, but the run was "
                f"accounted for n = {saved['population']}; a resume needs the same "
                "population"
            )
        self._aggregator().clip_norm = float(saved["clip_norm"])
        extra = self.ledger.restore(saved["ledger"])
        if extra:
            log(
                WARNING,
                "[privfed] %s holds %d round(s) after the checkpoint (in flight when the "
                "server stopped); they stay spent, and the rerun is recorded again",
                LEDGER_FILE,
                extra,
            )

    # -- helpers --------------------------------------------------------------------
    def _aggregator(self) -> ClientLevelAggregator:
        if self.dp is None:
            raise RuntimeError("start_run(node_ids) comes before the first round")
        return self.dp

    def _validator(self) -> UpdateValidator:
        if self.validator is None:  # client-level updates are always validated
            self.validator = UpdateValidator(self.cfg)
        return self.validator

    def _settings(self) -> ClientLevelSettings:
        return self._aggregator().settings

    def _log_outcome(self, server_round: int, outcome: ClientOutcome) -> None:
        if outcome.status.refused:
            log(WARNING, "round %d: partition %s refused (%s): %s", server_round,
                outcome.partition_id, outcome.status.value, outcome.reason)  # fmt: skip
        elif outcome.status.counter == "failed":
            log(WARNING, "round %d: node %d failed: %s", server_round, outcome.node_id,
                outcome.reason)  # fmt: skip
