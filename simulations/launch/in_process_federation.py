"""A federation in one process: real ClientApp training behind a Grid, no Flower processes.

For tests and benchmarks of the server's own logic (update validation, aggregation
rules), where a real SuperLink would only add minutes; a run goes through
``simulations.run``. Each node is a simulation context (its ledger lives in
``context.state``) whose ClientApp (``client.app``) answers it; a node may be given a
``tamper`` function that rewrites its honest reply before the server sees it (a
malicious or broken client).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    RecordDict,
)

import client.app as client_app
from common.config import RunConfig

_ids = itertools.count(1)

# (honest reply, server round) -> the reply the server gets, or None: no reply
Tamper = Callable[[Message, int], Message | None]
# (node, message type) -> True: the node is unreachable for that message (it is never
# delivered, so the node does not act on it), as a device that went offline
Lost = Callable[[int, str], bool]


def delivered(content: RecordDict, message_type: str, node: int) -> Message:
    """An instruction as a SuperNode would deliver it to ``node`` (ids, times filled in)."""
    metadata = Metadata(
        run_id=1,
        message_id=f"in-process-{next(_ids)}",
        src_node_id=1,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


class InProcessGrid:
    """Delivers each instruction to its node's ClientApp at once; replies on pull."""

    def __init__(
        self,
        contexts: dict[int, Context],
        tamper: dict[int, Tamper] | None = None,
        lost: Lost | None = None,
    ) -> None:
        self.contexts = contexts
        self.tamper = tamper or {}
        self.lost = lost or (lambda node, message_type: False)
        self.waiting: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            node = int(message.metadata.dst_node_id)
            message_type = message.metadata.message_type
            instruction = delivered(message.content, message_type, node)
            ids.append(instruction.metadata.message_id)
            if self.lost(node, message_type):
                continue
            reply = client_app.app(instruction, self.contexts[node])  # routes by type
            if node in self.tamper:
                reply = self.tamper[node](reply, _server_round(message.content))
            if reply is not None:
                self.waiting[instruction.metadata.message_id] = reply
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        return [self.waiting.pop(i) for i in list(ids) if i in self.waiting]


def _server_round(content: RecordDict) -> int:
    """The round an instruction belongs to (train config, or a protocol stage's)."""
    record = content["config"] if "config" in content else content["secagg"]
    return int(record["server-round"])


def federation(
    cfg: RunConfig, partitions: Iterable[int], num_partitions: int, first_node: int = 100
) -> dict[int, Context]:
    """One simulation context per partition, node ids ``first_node + partition``."""
    return {
        first_node + pid: Context(
            run_id=1,
            node_id=first_node + pid,
            node_config={"partition-id": pid, "num-partitions": num_partitions},
            state=RecordDict(),
            run_config=cfg.to_run_config(),
        )
        for pid in partitions
    }


# -- rewriting a reply -------------------------------------------------------------
def with_report(reply: Message, **changes: Any) -> Message:
    """``reply`` with report fields changed (``None`` removes one); arrays kept."""
    raw = dict(reply.content["report"])
    for key, value in changes.items():
        key = key.replace("_", "-")
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    content = RecordDict({**dict(reply.content.items()), "report": ConfigRecord(raw)})
    return Message(content=content, metadata=reply.metadata)


def with_arrays(reply: Message, arrays: dict[str, np.ndarray]) -> Message:
    """``reply`` carrying ``arrays`` as its model weights."""
    record = ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()})
    content = RecordDict({**dict(reply.content.items()), "arrays": record})
    return Message(content=content, metadata=reply.metadata)


def weights(reply: Message) -> dict[str, np.ndarray]:
    """The reply's model weights by name (a float32 reply: ``update-compression =
    "none"``; a compressed one carries its encoded change instead)."""
    record = reply.content["arrays"]
    return dict(zip(record.keys(), record.to_numpy_ndarrays(), strict=True))


def colluding_push(norm: float, seed: int = 7) -> Tamper:
    """An attacker's tamper: its honest weights plus one fixed random direction of L2
    norm ``norm``; attackers built with the same seed push the same way, every round."""

    def tamper(reply: Message, _round: int) -> Message:
        honest = weights(reply)
        rng = np.random.default_rng(seed)
        push = {k: rng.standard_normal(v.shape) for k, v in honest.items()}
        scale = norm / float(np.sqrt(sum(np.sum(p**2) for p in push.values())))
        return with_arrays(
            reply,
            {k: (honest[k] + push[k] * scale).astype(honest[k].dtype) for k in honest},
        )

    return tamper
