"""FedAvg that understands private clients: refusals, errors, and public weights.

A private update is weighted by the record count its round was planned from
(``planning-records``): N in a simulation, whose owner holds every shard, and on a
device its public planning count, which the update's noise scale reveals anyway.
No reply carries a device's true record count. A non-private run (whose policy
released ``num-examples``) weights by examples.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM
from flwr.supercore import log

from common.ledger.privacy_ledger import PrivacyLedger
from common.wire.reply import EvaluateReport
from common.wire.reply_fields import EVAL_METRICS, ReplyError, Status
from server.checks.ledger_witness import LedgerWitness
from server.checks.update_validation import UpdateValidator
from server.messaging import exchange
from server.results.client_outcomes import ClientOutcome, outcome_from_reply
from server.strategies.robust import aggregate_with, require_finite

WEIGHT_KEY = "aggregation-weight"  # set by the server, never sent by a client


if TYPE_CHECKING:
    from server.audit.gradient_canary_scores import GradientCanaryScores


class StrategyStateError(ValueError):
    """A checkpoint's strategy state does not fit the strategy resuming from it."""


@dataclass(frozen=True)
class TrainStep:
    """One round's training exchange: the new model (or ``None``), its metrics, how
    many instructions went out, and the seconds spent exchanging messages."""

    arrays: ArrayRecord | None
    metrics: MetricRecord | None
    sent: int
    exchange_seconds: float


def in_partition_order(
    replies: Iterable[Message],
) -> tuple[list[Message], list[ClientOutcome]]:
    """Replies and their outcomes sorted by (partition id, node id), not by arrival.

    Floating-point sums depend on their order; summing in arrival order would make
    two ``reproducible-noise`` runs of three or more clients differ in the last bits,
    and then in everything after.
    """
    pairs = [(outcome_from_reply(reply), reply) for reply in replies]
    pairs.sort(key=lambda pair: (_partition(pair[0]), pair[0].node_id))
    return [reply for _, reply in pairs], [outcome for outcome, _ in pairs]


def _partition(outcome: ClientOutcome) -> int:
    return -1 if outcome.partition_id is None else outcome.partition_id


def _train_loss(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean training loss, present only when every reply released one."""
    total = sum(float(r["weight"][weight_key]) for r in replies)
    losses = [r["weight"].get("train-loss") for r in replies]
    if any(loss is None for loss in losses) or total == 0:
        return MetricRecord({})
    mean = sum(float(r["weight"][weight_key]) * float(r["weight"]["train-loss"])
               for r in replies) / total  # fmt: skip
    return MetricRecord({"train-loss": mean})


class PrivateFedAvg(FedAvgM):
    """FedAvg over the clients that trained; refusals and failures are recorded.

    Only replies with status ``trained`` that pass update validation
    (``validator``, :mod:`server.checks.update_validation`) are aggregated: by the weighted
    mean, or by a robust ``rule`` (:mod:`server.strategies.robust`). The outcome of
    every reply of the last training round is kept in :attr:`last_outcomes`. With
    ``server_learning_rate`` 1 and ``server_momentum`` 0 (the defaults) this is
    plain FedAvg; otherwise Flower's FedAvgM step is applied to the average
    (post-processing of the private updates: no privacy cost).
    """

    def __init__(
        self,
        ledger_witness: LedgerWitness | None = None,
        validator: UpdateValidator | None = None,
        rule: FedAvg | None = None,
        **kwargs: object,
    ) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", _train_loss)
        super().__init__(weighted_by_key=WEIGHT_KEY, **kwargs)  # type: ignore[arg-type]
        self.last_outcomes: list[ClientOutcome] = []
        self.ledger_witness = ledger_witness
        self.validator = validator  # None: no update validation (benchmarks, tests)
        self.rule = rule  # a robust rule (server/strategies/rules/); None: the mean
        if rule is not None:  # it reads the same weights and losses as the mean
            rule.weighted_by_key = WEIGHT_KEY
            rule.train_metrics_aggr_fn = self.train_metrics_aggr_fn
        self.round_arrays: ArrayRecord | None = None  # the global model sent this round
        # a simulated white-box audit's scorer (server/audit/gradient_canary_scores.py)
        self.white_box: GradientCanaryScores | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's instructions, each with the ledger fingerprint seen from its node."""
        self.round_arrays = arrays  # what update validation compares replies with
        messages = super().configure_train(server_round, arrays, config, grid)
        witness = self.ledger_witness
        if witness is None:
            return messages
        return witness.annotate(messages, self.configrecord_key)

    # -- hooks the round loop calls (client-level DP overrides them) ----------------
    def start_run(self, node_ids: Sequence[int]) -> None:
        """Called once, with the nodes connected when the run starts."""
        if self.white_box is not None:  # a simulation: one node per partition
            self.white_box.start(len(set(node_ids)))

    def budget_stop(self, server_round: int) -> str | None:
        """Why the run must stop before ``server_round``; record-level budgets are the
        clients' own, so the server never stops a record-level run on ε."""
        return None

    def round_privacy(self) -> dict[str, Any]:
        """Privacy facts the strategy itself holds for ``rounds.jsonl`` (none here)."""
        return {}

    def summary_block(self) -> dict[str, Any] | None:
        """The strategy's own guarantee for ``summary.json`` (none here)."""
        return None

    # -- checkpoint and resume (server/results/checkpoint.py) -----------------------
    def state_dict(self) -> dict[str, Any]:
        """The strategy's own state besides the model and FedAvgM's momentum (JSON).

        Here each node's last accepted ledger, so that a resumed run still refuses a
        node whose ledger went back (update validation compares with it). A
        subclass extends the dict with its mechanism's state.
        """
        if self.validator is None:
            return {}
        accepted = self.validator.accepted.items()
        return {"validator": {str(node): led.to_dict() for node, led in accepted}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output (after ``start_run``); a state
        that does not fit raises :class:`StrategyStateError` (a ValueError)."""
        if self.validator is not None:
            self.validator.accepted.update(
                {int(node): PrivacyLedger.from_dict(led)
                 for node, led in state.get("validator", {}).items()}
            )  # fmt: skip

    def train_round(
        self, server_round: int, arrays: ArrayRecord, grid: Grid, timeout: float
    ) -> TrainStep:
        """Instruct, collect the replies, aggregate (secure aggregation overrides it:
        its round is several exchanges)."""
        started = time.monotonic()
        instructions = list(
            self.configure_train(server_round, arrays, ConfigRecord(), grid)
        )
        replies = exchange(grid, instructions, timeout) if instructions else []
        exchanged = time.monotonic() - started
        new_arrays, metrics = self.aggregate_train(server_round, replies)
        return TrainStep(new_arrays, metrics, len(instructions), exchanged)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the trained replies; record every reply's outcome."""
        replies, outcomes = in_partition_order(replies)
        if self.ledger_witness is not None:  # a reply behind the witness becomes an error
            outcomes = self.ledger_witness.check(server_round, outcomes)
        decoded: list[list[np.ndarray] | None] = [None] * len(replies)
        if self.validator is not None:  # a reply failing a check becomes 'rejected'
            if self.round_arrays is None:
                raise RuntimeError("configure_train comes before aggregate_train")
            checked = [
                self.validator.validate(server_round, reply, outcome, self.round_arrays)
                for reply, outcome in zip(replies, outcomes, strict=True)
            ]
            outcomes = [outcome for outcome, _ in checked]
            decoded = [arrays for _, arrays in checked]
        self.last_outcomes = outcomes
        weighted: list[Message] = []
        for reply, outcome, arrays in zip(replies, outcomes, decoded, strict=True):
            if outcome.status is Status.TRAINED:
                metrics = {WEIGHT_KEY: float(outcome.weight or 0)}
                if outcome.train_loss is not None:
                    metrics["train-loss"] = outcome.train_loss
                weights = self._weights(reply, outcome, arrays)
                if self.white_box is not None and self.round_arrays is not None:
                    self.white_box.observe(
                        server_round, int(outcome.partition_id),
                        weights.to_numpy_ndarrays(), self.round_arrays.to_numpy_ndarrays(),
                    )  # fmt: skip
                content = RecordDict(
                    {
                        "arrays": weights,
                        "weight": MetricRecord(metrics),
                    }
                )
                weighted.append(Message(content=content, metadata=reply.metadata))
            elif outcome.status.refused:
                log(
                    WARNING,
                    "round %d: partition %s refused to train (%s)%s",
                    server_round,
                    outcome.partition_id,
                    outcome.status.value,
                    f": {outcome.reason}" if outcome.reason else "",
                )
            elif outcome.status.counter == "failed":  # rejections: the validator logs
                log(WARNING, "round %d: node %d failed: %s", server_round,
                    outcome.node_id, outcome.reason)  # fmt: skip
        if not weighted:
            return None, None
        if self.rule is None:
            arrays, metrics = super().aggregate_train(server_round, weighted)
        else:  # the robust aggregate, then FedAvgM's server step on it
            robust, metrics = aggregate_with(self.rule, server_round, weighted)
            if robust is None:
                return None, None
            content = RecordDict(
                {"arrays": robust, "weight": MetricRecord({WEIGHT_KEY: 1.0})}
            )
            arrays, _ = super().aggregate_train(
                server_round, [Message(content=content, metadata=weighted[0].metadata)]
            )
        require_finite(server_round, arrays)
        return arrays, metrics

    def _weights(
        self, reply: Message, outcome: ClientOutcome, decoded: list[np.ndarray] | None
    ) -> ArrayRecord:
        """A trained reply's weights: as sent, or decoded by update validation."""
        if not outcome.compressed:
            return reply.content["arrays"]
        if decoded is None or self.round_arrays is None:
            raise RuntimeError("a compressed reply is decoded by update validation")
        keys = self.round_arrays.keys()
        return ArrayRecord({k: Array(a) for k, a in zip(keys, decoded, strict=True)})

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted local test metrics of the nodes whose policy releases them."""
        scored: list[EvaluateReport] = []
        for reply in replies:
            if reply.has_error():
                log(WARNING, "round %d: evaluation failed on node %d: %s", server_round,
                    reply.metadata.src_node_id, reply.error.reason)  # fmt: skip
                continue
            try:
                report = EvaluateReport.from_content(reply.content)
            except ReplyError as exc:
                log(WARNING, "round %d: node %d: %s", server_round,
                    reply.metadata.src_node_id, exc)  # fmt: skip
                continue
            if report.status is Status.SCORED:
                scored.append(report)
        if not scored:
            return None
        total = sum(r.num_examples or 0 for r in scored)
        means = {
            f"eval-{name}": sum(
                (r.num_examples or 0) * dict(r.scores)[name] for r in scored
            )
            / total
            for name in EVAL_METRICS
        }
        return MetricRecord({**means, "num-examples": total, "nodes": len(scored)})
