"""Flower messages and contexts as a SuperNode delivers them, without a federation."""

from __future__ import annotations

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    RecordDict,
)

from common.config import RunConfig
from simulations.launch.in_process_federation import delivered


def make_message(content: RecordDict, message_type: str, dst_node_id: int = 5) -> Message:
    """A server-to-client instruction message, as a SuperNode would deliver it."""
    return delivered(content, message_type, dst_node_id)


def train_message(arrays: ArrayRecord, server_round: int, node_id: int = 5) -> Message:
    """A training instruction carrying global weights and the server round."""
    content = RecordDict(
        {"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}
    )
    return make_message(content, MessageType.TRAIN, node_id)


def evaluate_message(arrays: ArrayRecord, server_round: int, node_id: int = 5) -> Message:
    """An evaluation instruction carrying global weights."""
    content = RecordDict(
        {"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}
    )
    return make_message(content, MessageType.EVALUATE, node_id)


def make_context(
    cfg: RunConfig, partition_id: int = 0, num_partitions: int = 10, node_id: int = 5
) -> Context:
    """A simulation-style context for one node."""
    return Context(
        run_id=1,
        node_id=node_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=cfg.to_run_config(),
    )


def pushed_instruction(dst_node_id: int, content: RecordDict | None = None) -> Message:
    """A train instruction as the ServerApp hands it to its grid: from the SuperLink
    (node 1), not yet given a message ID."""
    meta = Metadata(
        run_id=1, message_id="", src_node_id=1, dst_node_id=dst_node_id,
        reply_to_message_id="", group_id="", message_type=MessageType.TRAIN,
        created_at=0.0, ttl=10.0,
    )  # fmt: skip
    return Message(content if content is not None else RecordDict(), metadata=meta)
