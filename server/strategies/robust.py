"""Applying a robust aggregation rule (run key ``aggregation``) to the replies.

The rules themselves, one module each, are in :mod:`server.strategies.rules`
(``median``: Flower's FedMedian; ``trimmed-mean``: FedTrimmedAvg; ``krum``: Krum);
``fedavg`` is :class:`server.strategies.private_fedavg.PrivateFedAvg`'s own weighted
mean. A robust rule replaces the mean; the server step (``server-learning-rate``,
``server-momentum``) is then applied to its result.

Which privacy modes allow which rule is decided in :class:`common.config.RunConfig`:
with sample-level DP (or none) every rule is post-processing of the released
updates; client-level DP accounts for the noised mean only, so it takes ``fedavg``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg


class AggregateNotFinite(RuntimeError):
    """The aggregate holds NaN or infinite values; the global model is not replaced."""


def aggregate_with(
    rule: FedAvg, server_round: int, replies: list[Message]
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """``rule``'s aggregate of ``replies`` (each: one ArrayRecord, one MetricRecord).

    FedMedian and FedTrimmedAvg pop the arrays out of the messages they read, so
    each reply is handed over in a shallow copy; the replies stay intact.
    """
    copies = []
    for reply in replies:
        content = RecordDict(
            {
                key: ArrayRecord(dict(record.items()))
                if isinstance(record, ArrayRecord)
                else record
                for key, record in reply.content.items()
            }
        )
        copies.append(Message(content=content, metadata=reply.metadata))
    return rule.aggregate_train(server_round, copies)


def require_finite(server_round: int, arrays: ArrayRecord | None) -> None:
    """Raise :class:`AggregateNotFinite` if the new global model is not finite."""
    if arrays is None:
        return
    for key, array in arrays.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            raise AggregateNotFinite(
                f"round {server_round}: the aggregate's {key!r} holds NaN or infinite "
                "values; the global model of the previous round is kept (lower run "
                "config key 'max-update-norm', or choose a robust 'aggregation')"
            )
