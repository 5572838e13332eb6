"""FedAvg that understands private clients: refusals, errors and ε per client."""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvgM
from flwr.supercore import log

from common.protocol import STATUS_BUDGET_EXHAUSTED, STATUS_TRAINED
from server.client_outcomes import ClientOutcome, outcome_from_reply


def _mean_train_loss(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean training loss (other client metrics are per-client).

    Private clients do not send their loss (it is not covered by DP), so there is a
    mean only when every reply carries one (non-private runs).
    """
    total = sum(float(r["metrics"][weight_key]) for r in replies)
    if not all("train-loss" in r["metrics"] for r in replies):
        return MetricRecord({weight_key: int(total)})
    loss = sum(
        float(r["metrics"]["train-loss"]) * float(r["metrics"][weight_key]) for r in replies
    )
    return MetricRecord({"train-loss": loss / total, weight_key: int(total)})


class PrivateFedAvg(FedAvgM):
    """FedAvg over the clients that trained; refusals and failures are recorded.

    Only replies with status ``trained`` are averaged. The outcome of every
    reply of the last training round is kept in :attr:`last_outcomes`. With
    ``server_learning_rate`` 1 and ``server_momentum`` 0 (the defaults) this is
    plain FedAvg; otherwise Flower's FedAvgM step is applied to the average
    (post-processing of the private updates: no privacy cost).
    """

    def __init__(self, **kwargs: object) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", _mean_train_loss)
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.last_outcomes: list[ClientOutcome] = []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the trained replies; record every reply's outcome."""
        replies = list(replies)
        outcomes = [outcome_from_reply(reply) for reply in replies]
        self.last_outcomes = outcomes
        trained = [
            reply
            for reply, outcome in zip(replies, outcomes, strict=True)
            if outcome.status == STATUS_TRAINED
        ]
        for outcome in outcomes:
            if outcome.status == STATUS_BUDGET_EXHAUSTED:
                log(
                    WARNING,
                    "round %d: partition %s refused to train: privacy budget exhausted "
                    "(ε=%.3f, would be %.3f > budget %.3f)",
                    server_round,
                    outcome.partition_id,
                    outcome.epsilon or 0.0,
                    outcome.epsilon_would_be or 0.0,
                    outcome.epsilon_budget or 0.0,
                )
            elif outcome.status != STATUS_TRAINED:
                log(
                    WARNING,
                    "round %d: node %d failed: %s",
                    server_round,
                    outcome.node_id,
                    outcome.error,
                )
        if not trained:
            return None, None
        return super().aggregate_train(server_round, trained)
