"""Many virtual clients behind one simulated SuperNode: the envelope both sides read.

Flower's simulation engine costs tens of milliseconds per message, whatever the
message does, while a client-level round of a small model trains in a few. So a
simulation may run fewer SuperNodes than clients: each hosts a fixed share of the
partitions (``virtual-clients``; docs/simulation.md, "Virtual clients"). The
server's grid (:mod:`server.virtual_grid`) packs the round's instructions for one
SuperNode into one *group* message. The SuperNode (:mod:`client.virtual_clients`)
unpacks it, runs the ordinary ClientApp handler once per virtual client, with that
client's own partition, context state, ledger and noise, and packs the replies into
one group reply, which the grid unpacks into one reply per virtual client. The
strategy, the privacy mechanisms and every check see exactly the messages they see
without groups; only the transport is shared.

Records the instructions have in common (the global model) travel once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flwr.app import ConfigRecord, Error, RecordDict

GROUP_ACTION = "virtual_group"  # a group message's type is "<category>.virtual_group"
DISCOVERY_TYPE = "query.virtual_clients"  # which partitions a SuperNode hosts
INDEX_KEY = "virtual-group"  # the envelope's ConfigRecord: a JSON index of entries
HOSTED_KEY = "virtual-clients"  # a discovery reply's ConfigRecord
CATEGORIES = ("train", "evaluate", "query")


def group_type(message_type: str) -> str:
    """The group message type for instructions of ``message_type`` (its category)."""
    category = message_type.split(".", 1)[0]
    if category not in CATEGORIES:
        raise ValueError(f"cannot group messages of type {message_type!r}")
    return f"{category}.{GROUP_ACTION}"


def virtual_node_id(partition_id: int) -> int:
    """The node ID the server sees for a virtual client: its partition + 1 (0 is
    never a Flower node ID)."""
    return partition_id + 1


def hosted_partitions(first: int, step: int, total: int) -> range:
    """A SuperNode with ``partition-id`` ``first`` of ``step`` SuperNodes hosts every
    ``step``-th of the ``total`` virtual clients' partitions, from ``first``."""
    return range(first, total, step)


@dataclass(frozen=True)
class Entry:
    """One virtual client's message inside an envelope: its instruction, or its reply
    (``content`` or ``error``)."""

    node_id: int  # the virtual client's node ID (:func:`virtual_node_id`)
    partition_id: int
    message_id: str  # the instruction's ID (a reply's reply_to)
    message_type: str
    content: RecordDict | None = None
    error: Error | None = None

    def __post_init__(self) -> None:
        if (self.content is None) == (self.error is None):
            raise ValueError("an entry carries content or an error, exactly one")
        if self.partition_id < 0 or self.node_id != virtual_node_id(self.partition_id):
            raise ValueError(
                f"entry for node {self.node_id}: not virtual client "
                f"{self.partition_id}'s node ID"
            )


def pack(entries: list[Entry]) -> RecordDict:
    """One envelope for ``entries``; a record object several entries share is sent once."""
    envelope = RecordDict()
    slot_of: dict[int, str] = {}
    index = []
    for entry in entries:
        item: dict[str, object] = {
            "node": entry.node_id,
            "partition": entry.partition_id,
            "id": entry.message_id,
            "type": entry.message_type,
        }
        if entry.error is not None:
            item["error"] = [int(entry.error.code), entry.error.reason or ""]
        else:
            records = {}
            for key, record in entry.content.items():  # type: ignore[union-attr]
                slot = slot_of.get(id(record))
                if slot is None:
                    slot = slot_of[id(record)] = f"r{len(slot_of)}"
                    envelope[slot] = record
                records[key] = slot
            item["records"] = records
        index.append(item)
    envelope[INDEX_KEY] = ConfigRecord({"entries": json.dumps(index)})
    return envelope


def unpack(envelope: RecordDict) -> list[Entry]:
    """The entries of an envelope :func:`pack` made (shared records stay shared)."""
    if INDEX_KEY not in envelope.config_records:
        raise ValueError(f"not a virtual-client envelope: no {INDEX_KEY!r} record")
    entries = []
    for item in json.loads(str(envelope.config_records[INDEX_KEY]["entries"])):
        content = error = None
        if "error" in item:
            code, reason = item["error"]
            error = Error(code=int(code), reason=str(reason))
        else:
            content = RecordDict(
                {key: envelope[slot] for key, slot in item["records"].items()}
            )
        entries.append(
            Entry(
                node_id=int(item["node"]),
                partition_id=int(item["partition"]),
                message_id=str(item["id"]),
                message_type=str(item["type"]),
                content=content,
                error=error,
            )
        )
    return entries
