"""The aggregation rule (run key ``aggregation``): Flower's robust strategies do the
arithmetic.

``fedavg`` is :class:`server.strategies.private_fedavg.PrivateFedAvg`'s own weighted mean.
``median`` (:class:`FedMedian`, coordinate-wise, unweighted), ``trimmed-mean``
(:class:`FedTrimmedAvg`, ``trim-fraction`` cut from each tail per coordinate,
unweighted) and ``krum`` (:class:`Krum`, the one update closest to its
n − ``krum-byzantine`` − 2 nearest neighbours) replace the mean; the server step
(``server-learning-rate``, ``server-momentum``) is then applied to their result.

Which privacy modes allow which rule is decided in :class:`common.config.RunConfig`:
with sample-level DP (or none) every rule is post-processing of the released
updates; client-level DP accounts for the noised mean only, so it takes ``fedavg``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum

from common.config import RunConfig


class AggregateNotFinite(RuntimeError):
    """The aggregate holds NaN or infinite values; the global model is not replaced."""


def make_rule(cfg: RunConfig) -> FedAvg | None:
    """Flower's strategy for ``cfg.aggregation``; ``None`` for ``fedavg`` (the mean).

    The strategy that uses it sets the rule's weight key and metrics function to
    its own (:class:`server.strategies.private_fedavg.PrivateFedAvg`).
    """
    if cfg.aggregation == "fedavg":
        return None
    if cfg.aggregation == "median":
        return FedMedian()
    if cfg.aggregation == "trimmed-mean":
        return FedTrimmedAvg(beta=cfg.trim_fraction)
    if cfg.aggregation == "krum":
        return Krum(num_malicious_nodes=cfg.krum_byzantine)
    raise ValueError(f"unknown aggregation {cfg.aggregation!r}")


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
