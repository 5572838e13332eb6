"""What each client reported in a training round, parsed from its reply."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import Message

from common.protocol import METRICS_KEY, PRIVACY_KEY, STATUS_ERROR


@dataclass(frozen=True)
class ClientOutcome:
    """One client's training reply: status, privacy spend and loss."""

    node_id: int
    status: str
    partition_id: int | None = None
    num_examples: int = 0
    train_loss: float | None = None
    client_seconds: float | None = None
    epsilon: float | None = None
    epsilon_would_be: float | None = None
    epsilon_budget: float | None = None
    delta: float | None = None
    accountant: str | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps_round: int | None = None
    steps_total: int | None = None
    rounds_trained: int | None = None
    history: list[list[float]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; infinities become ``None``."""
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, float) and value in (float("inf"), float("-inf")):
                data[key] = None
        return data


def _num(metrics: Any, key: str, kind: type = float) -> Any:
    return kind(metrics[key]) if key in metrics else None


def outcome_from_reply(reply: Message) -> ClientOutcome:
    """Parse a training reply (or its error) into a :class:`ClientOutcome`."""
    node_id = int(reply.metadata.src_node_id)
    if reply.has_error():
        return ClientOutcome(node_id=node_id, status=STATUS_ERROR, error=reply.error.reason)
    content = reply.content
    metrics = content.metric_records.get(METRICS_KEY, {})
    privacy = content.config_records.get(PRIVACY_KEY, {})
    ledger = privacy.get("ledger")
    history = json.loads(str(ledger))["history"] if ledger else []
    return ClientOutcome(
        node_id=node_id,
        status=str(privacy.get("status", STATUS_ERROR)),
        partition_id=_num(metrics, "partition-id", int),
        num_examples=int(metrics.get("num-examples", 0)),
        train_loss=_num(metrics, "train-loss"),
        client_seconds=_num(metrics, "client-seconds"),
        epsilon=_num(metrics, "epsilon"),
        epsilon_would_be=_num(metrics, "epsilon-would-be"),
        epsilon_budget=_num(metrics, "epsilon-budget"),
        delta=_num(metrics, "delta"),
        accountant=str(privacy["accountant"]) if "accountant" in privacy else None,
        noise_multiplier=_num(metrics, "noise-multiplier"),
        sample_rate=_num(metrics, "sample-rate"),
        steps_round=_num(metrics, "steps-round", int),
        steps_total=_num(metrics, "steps-total", int),
        rounds_trained=_num(metrics, "rounds-trained", int),
        history=history,
        error=str(privacy["error"]) if "error" in privacy else None,
    )
