"""The server's side of virtual clients: a grid that shows one node per client.

With ``virtual-clients`` = N, a simulation runs fewer SuperNodes than clients
(:mod:`common.wire.virtual_group`). This grid asks each SuperNode once which
partitions it hosts, shows the strategy one node ID per virtual client, packs the
instructions for one SuperNode into one group message, and unpacks each group reply
into one reply per virtual client, with that client's node ID. Everything above it
(sampling, the privacy mechanisms, validation, ledgers, results) is unchanged.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from logging import WARNING

from flwr.app import ConfigRecord, Error, Message, Metadata, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from common.wire.virtual_group import (
    DISCOVERY_TYPE,
    HOSTED_KEY,
    Entry,
    group_type,
    hosted_partitions,
    pack,
    unpack,
    virtual_node_id,
)
from server.messaging import WrappedGrid, exchange

DISCOVERY_TIMEOUT_S = 120.0  # a simulated SuperNode answers at once, or is broken


class VirtualGridError(RuntimeError):
    """The SuperNodes do not host the run's virtual clients between them."""


class VirtualGrid(WrappedGrid):
    """Wraps the simulation's grid; see the module docstring."""

    def __init__(self, grid: Grid, virtual_clients: int) -> None:
        if virtual_clients < 1:
            raise ValueError("virtual_clients must be >= 1")
        super().__init__(grid)
        self.total = virtual_clients
        self._real: tuple[int, ...] = ()
        self._host: dict[int, int] = {}  # virtual node ID -> SuperNode ID
        self._groups: dict[str, list[str]] = {}  # group message ID -> virtual IDs
        self._group_of: dict[str, str] = {}  # virtual message ID -> group message ID
        self._instruction: dict[str, Entry] = {}  # virtual message ID -> its entry
        self._replies: dict[str, Message] = {}  # unpacked, not yet pulled

    # -- who is there ------------------------------------------------------------
    def get_node_ids(self) -> Iterable[int]:
        """One node ID per virtual client, once every SuperNode said what it hosts;
        none while some SuperNode has not (the round loop waits for nodes)."""
        real = tuple(sorted(self.grid.get_node_ids()))
        if real != self._real:
            self._host, settled = self._discover(real) if real else ({}, True)
            self._real = real if settled else ()  # unsettled: ask again next time
        return list(self._host)

    def _discover(self, real: tuple[int, ...]) -> tuple[dict[int, int], bool]:
        """Each virtual client's SuperNode, and whether that answer is settled for
        these SuperNodes: it is not when one did not reply in time (a busy machine
        still starting its Ray workers), so the next call asks again rather than
        waiting for a change in the SuperNodes that may never come."""
        asked = [
            Message(
                RecordDict({"config": ConfigRecord({"virtual-clients": self.total})}),
                dst_node_id=node,
                message_type=DISCOVERY_TYPE,
            )
            for node in real
        ]
        replies = exchange(self.grid, asked, DISCOVERY_TIMEOUT_S)
        if len(replies) < len(real):
            silent = sorted(set(real) - {int(r.metadata.src_node_id) for r in replies})
            log(
                WARNING,
                "SuperNodes %s did not say which clients they host within %g s; "
                "asking again",
                silent,
                DISCOVERY_TIMEOUT_S,
            )
            return {}, False
        host: dict[int, int] = {}
        for reply in replies:
            if reply.has_error():
                raise VirtualGridError(
                    f"SuperNode {reply.metadata.src_node_id} cannot host virtual "
                    f"clients: {reply.error.reason}"
                )
            said = reply.content.config_records[HOSTED_KEY]
            first, step, total = int(said["first"]), int(said["step"]), int(said["total"])
            if step > len(real):  # a SuperNode has not registered yet: asked when it has
                return {}, True
            if total != self.total or step != len(real):
                raise VirtualGridError(
                    f"SuperNode {reply.metadata.src_node_id} hosts partitions "
                    f"{first}::{step} of {total}, but the run has {self.total} virtual "
                    f"clients on {len(real)} SuperNodes"
                )
            for pid in hosted_partitions(first, step, total):
                if virtual_node_id(pid) in host:
                    raise VirtualGridError(f"partition {pid} is hosted twice")
                host[virtual_node_id(pid)] = int(reply.metadata.src_node_id)
        if len(host) != self.total:  # cannot happen once every SuperNode answered
            raise VirtualGridError(
                f"the SuperNodes host {len(host)} of the run's {self.total} virtual clients"
            )
        return dict(sorted(host.items())), True

    # -- messages ----------------------------------------------------------------
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Pack each SuperNode's instructions into one group message and push them;
        return one (virtual) message ID per instruction, in order."""
        ids: list[str] = []
        batches: dict[tuple[int, str], list[Entry]] = {}
        templates: dict[tuple[int, str], Message] = {}
        for message in messages:
            vid = int(message.metadata.dst_node_id)
            if vid not in self._host:
                raise VirtualGridError(f"node {vid} is not a virtual client of this run")
            message_id = uuid.uuid4().hex
            entry = Entry(
                vid, vid - 1, message_id, message.metadata.message_type,
                content=message.content,
            )  # fmt: skip
            key = (self._host[vid], group_type(entry.message_type))
            batches.setdefault(key, []).append(entry)
            templates.setdefault(key, message)
            self._instruction[message_id] = entry
            ids.append(message_id)
        groups = []
        for (node, kind), entries in batches.items():
            meta = templates[(node, kind)].metadata
            groups.append(
                Message(
                    pack(entries),
                    dst_node_id=node,
                    message_type=kind,
                    group_id=meta.group_id,
                    ttl=meta.ttl,
                )  # fmt: skip
            )
        group_ids = list(self.grid.push_messages(groups))
        for group_id, entries in zip(group_ids, batches.values(), strict=True):
            self._groups[group_id] = [e.message_id for e in entries]
            for e in entries:
                self._group_of[e.message_id] = group_id
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies in of ``message_ids``: each group reply, once in, unpacked."""
        wanted = list(message_ids)
        pending = {self._group_of[i] for i in wanted if i in self._group_of}
        pending &= set(self._groups)
        for reply in self.grid.pull_messages(pending) if pending else ():
            self._unpack(reply)
        out = []
        for message_id in wanted:
            reply = self._replies.pop(message_id, None)
            if reply is not None:
                out.append(reply)
                self._instruction.pop(message_id, None)
                self._group_of.pop(message_id, None)
        return out

    def _unpack(self, group_reply: Message) -> None:
        members = self._groups.pop(group_reply.metadata.reply_to_message_id, [])
        if group_reply.has_error():  # the whole SuperNode failed: each member did
            for message_id in members:
                entry = self._instruction[message_id]
                self._replies[message_id] = _reply(
                    entry, group_reply, None, group_reply.error,
                    src=int(group_reply.metadata.src_node_id),
                )  # fmt: skip
            return
        for got in unpack(group_reply.content):
            entry = self._instruction.get(got.message_id)
            if entry is None or got.message_id not in members:
                continue  # not an instruction of this group: dropped
            if got.node_id != entry.node_id:
                continue  # a reply for another client: dropped
            self._replies[got.message_id] = _reply(
                entry, group_reply, got.content, got.error, src=entry.node_id
            )


def _reply(
    entry: Entry,
    group_reply: Message,
    content: RecordDict | None,
    error: Error | None,
    src: int,
) -> Message:
    """A reply to ``entry`` as if its virtual client had sent it alone."""
    meta = group_reply.metadata
    metadata = Metadata(
        run_id=meta.run_id,
        message_id=uuid.uuid4().hex,
        src_node_id=src,
        dst_node_id=meta.dst_node_id,
        reply_to_message_id=entry.message_id,
        group_id=meta.group_id,
        created_at=meta.created_at or time.time(),
        ttl=meta.ttl,
        message_type=entry.message_type,
    )
    if error is not None:
        return Message(error=error, metadata=metadata)
    return Message(content=content, metadata=metadata)
