"""What a node replies when it cannot answer: bad data, or an exception.

Either way the reply names the reason the server may read (a dataset check's public
reason, an exception's type on a device) and the rest (values, row numbers, an
exception's message, which may describe the local data) stays in the node's log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context, Message, RecordDict

from common.data.checks import DatasetError
from common.wire.reply import EvaluateReport, TrainReport

log = logging.getLogger("privfed.client")

Handler = Callable[[Message, Context], Message]


def deployed(context: Context) -> bool:
    """A real device: its data and policy are its owner's, not the server's."""
    return "state-dir" in context.node_config or "data-path" in context.node_config


def partition_id(context: Context) -> int:
    """The node's simulated partition, or -1 (a device's own data)."""
    pid = context.node_config.get("partition-id", -1)
    return pid if isinstance(pid, int) else -1


def data_refusal(
    msg: Message,
    context: Context,
    exc: DatasetError,
    failed: Callable[[int, str], TrainReport | EvaluateReport],
) -> Message:
    """Bad data: refuse before the ledger is read; values and rows stay in the log."""
    log.error("refusing the %s message: %s", msg.metadata.message_type, exc)
    report = failed(partition_id(context), exc.public_reason)
    return Message(report.to_content(), reply_to=msg)


def sanitised(handler: Handler, failed: Callable[[int, str], RecordDict]) -> Handler:
    """On a device, no exception text leaves the node.

    Flower would send an exception's message to the server, and a loader's or
    planner's message can name record counts or values. A device replies with
    the exception's type only and logs the rest; a simulation (whose owner holds
    every shard) lets the exception through for debugging.
    """

    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            if not deployed(context):
                raise
            log.exception("could not answer the %s message", msg.metadata.message_type)
            reason = (
                f"{type(exc).__name__} on the node; the details stay in its log "
                "(they may describe the local data)"
            )
            return Message(failed(partition_id(context), reason), reply_to=msg)

    return run


def train_failed(pid: int, why: str) -> RecordDict:
    """The content of a training (or secure-aggregation stage) reply that could not be
    made: a node error with ``why``."""
    return TrainReport.node_error(pid, why).to_content()


def evaluate_failed(pid: int, why: str) -> RecordDict:
    """The content of an evaluation reply that could not be made."""
    return EvaluateReport.node_error(pid, why).to_content()
