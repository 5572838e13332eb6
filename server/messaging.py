"""Messages out, replies in: one exchange with the nodes, polled briskly, and the
bytes each node's messages cost (``rounds.jsonl``'s ``message_bytes``)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Sequence
from logging import WARNING
from typing import Any

from flwr.app import Message, Metadata, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import ObjectPushError
from flwr.supercore.run import Run

PUSH_ATTEMPTS = 4  # a push that Flower's session mix-up broke, tried again
PUSH_BACKOFF_S = 2.0  # seconds before the second attempt, doubling after
REMOTE_POLL_S = 0.1  # the longest wait between pulls from a SuperLink (a gRPC call)
LOCAL_POLL_S = 0.01  # ... from a link state in this process (a dictionary lookup)


def push_again_on_session_loss(grid: Grid, messages: list[Message]) -> list[str]:
    """``grid.push_messages``, pushed again when Flower loses the push session.

    Flower 1.42's ServerApp retries a ``PushMessages`` call whose connection failed;
    on a loaded SuperLink the first call can still arrive after the retry, take over
    the messages' push session, and the objects then pushed under the retry's
    session are refused (``ObjectPushError``: "the push session may have expired or
    been replaced"), which ended whole runs here (docs/faults.md). Pushing the same
    messages again is safe: their IDs are their content's, the SuperLink keeps one
    copy of each, and only the objects it still lacks are asked for.
    """
    for attempt in range(1, PUSH_ATTEMPTS + 1):
        try:
            return list(grid.push_messages(messages))
        except ObjectPushError as exc:
            if attempt == PUSH_ATTEMPTS:
                raise
            wait = PUSH_BACKOFF_S * 2 ** (attempt - 1)
            log(
                WARNING,
                "[privfed] pushing %d messages failed (%s); pushing them again in "
                "%.0f s (attempt %d of %d)",
                len(messages), exc, wait, attempt + 1, PUSH_ATTEMPTS,
            )  # fmt: skip
            time.sleep(wait)
    raise AssertionError("unreachable")


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    first_poll: float = 0.01,
    max_poll: float | None = None,
) -> list[Message]:
    """Push ``messages`` and collect their replies until all are in or ``timeout``.

    Like ``Grid.send_and_receive``, but polls from ``first_poll`` seconds, growing
    to ``max_poll``: Flower's deployment grid sleeps a fixed 3 s between pulls,
    which would add up to 3 s of idle time to every exchange. A cap of 0.5 s cost
    a simulated round of 100 clients 0.07 s (0.82 s against 0.75 s, BENCHMARKS.md);
    an empty pull is one small call to the SuperLink (cap :data:`REMOTE_POLL_S`), or
    in a simulation a lookup in this process (:data:`LOCAL_POLL_S`).
    """
    if max_poll is None:
        max_poll = LOCAL_POLL_S if _in_process(grid) else REMOTE_POLL_S
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    poll = first_poll
    while pending:
        pulled = list(grid.pull_messages(pending))
        replies.extend(pulled)
        pending.difference_update(m.metadata.reply_to_message_id for m in pulled)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))
        poll = min(poll * 1.5, max_poll)
    return replies


def _in_process(grid: Grid) -> bool:
    """Whether ``grid`` (unwrapped) reads the link state of this process, as Flower's
    simulation grid does (it holds the state; a SuperLink's grid holds a channel)."""
    while isinstance(grid, WrappedGrid):
        grid = grid.grid
    return getattr(grid, "state", None) is not None


_SIZES: dict[str, int] = {}  # object ID -> deflated size, for objects sent to many
_SIZES_KEPT = 4096


def content_bytes(content: RecordDict) -> int:
    """Serialised size of a message's content: Flower sends a message as the tree of
    its objects (records, arrays, chunks), each deflated to bytes.

    An object's ID is the SHA-256 of its deflated bytes, so a size found once is
    reused for every message that carries the same object: the round's model goes
    to 1,000 virtual clients, and deflating it for each cost most of 0.6 ms a client.
    """
    total = 0
    # Flower recomputes a record's ID, and so its children's, every time it is
    # asked; here nothing changes, so each object's ID is computed once (half the
    # time of a virtual client's reply).
    with no_object_id_recompute():
        for object_id, obj in get_all_nested_objects(content).items():
            size = _SIZES.get(object_id)
            if size is None:
                size = len(obj.deflate())
                if len(_SIZES) >= _SIZES_KEPT:
                    _SIZES.clear()
                _SIZES[object_id] = size
            total += size
    return total


class WrappedGrid(Grid):
    """A grid that passes everything to the grid it wraps; subclasses change some."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Run) -> None:
        """As the wrapped grid."""
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """As the wrapped grid."""
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """As the wrapped grid."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """As the wrapped grid."""
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """As the wrapped grid."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """As the wrapped grid."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push and collect the replies (:func:`exchange`, polled briskly)."""
        return exchange(self, messages, math.inf if timeout is None else timeout)


class CountingGrid(WrappedGrid):
    """A grid that counts the serialised content bytes (:func:`content_bytes`) of every
    message it pushes (down, by destination node) and every reply it pulls (up, by
    source node); everything else is the wrapped grid's. A reply that is an error
    carries no content and counts nothing.

    Flower's own error replies (a node stopped heartbeating, a message expired) come
    from the SuperLink's node ID, not the node's: :attr:`unavailable` names the
    node each one answers for (by the message it replies to), with its reason."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}
        self.unavailable: dict[int, str] = {}
        self._destination: dict[str, int] = {}  # message ID -> node

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Count, then push."""
        messages = list(messages)
        for message in messages:
            node = int(message.metadata.dst_node_id)
            self.down[node] = self.down.get(node, 0) + content_bytes(message.content)
        ids = push_again_on_session_loss(self.grid, messages)
        for message, message_id in zip(messages, ids, strict=False):
            self._destination[message_id] = int(message.metadata.dst_node_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull, then count."""
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            if not reply.has_error():
                node = int(reply.metadata.src_node_id)
                self.up[node] = self.up.get(node, 0) + content_bytes(reply.content)
                continue
            node = self._destination.get(reply.metadata.reply_to_message_id, -1)
            if node >= 0 and node != int(reply.metadata.src_node_id):
                self.unavailable[node] = reply.error.reason
        return [self._readdressed(reply) for reply in replies]

    def _readdressed(self, reply: Message) -> Message:
        """A Flower error reply made on a node's behalf, from that node: the round's
        outcomes, warnings and ``rounds.jsonl`` then name the node, not the SuperLink."""
        if not reply.has_error():
            return reply
        node = self._destination.get(reply.metadata.reply_to_message_id, -1)
        meta = reply.metadata
        if node < 0 or node == int(meta.src_node_id):
            return reply
        metadata = Metadata(
            run_id=meta.run_id, message_id=meta.message_id, src_node_id=node,
            dst_node_id=meta.dst_node_id, reply_to_message_id=meta.reply_to_message_id,
            group_id=meta.group_id, created_at=meta.created_at, ttl=meta.ttl,
            message_type=meta.message_type,
        )  # fmt: skip
        return Message(error=reply.error, metadata=metadata)

    def facts(self) -> dict[str, Any]:
        """Per node up and down: how many nodes, median and largest per node, total."""
        return {**_direction("up", self.up), **_direction("down", self.down)}


def _direction(name: str, per_node: dict[int, int]) -> dict[str, Any]:
    sizes = list(per_node.values())
    return {
        f"{name}_clients": len(sizes),
        f"{name}_per_client_median": statistics.median(sizes) if sizes else None,
        f"{name}_per_client_max": max(sizes, default=None),
        f"{name}_total": sum(sizes),
    }


def round_bytes(
    encoding: str, train: CountingGrid, evaluate: CountingGrid | None
) -> dict[str, Any]:
    """``rounds.jsonl``'s ``message_bytes``: the update encoding, and the training (and
    federated-evaluation) exchanges' bytes per node."""
    return {
        "update_encoding": encoding,
        "train": train.facts(),
        "evaluate": evaluate.facts() if evaluate is not None else None,
    }


def run_bytes(rounds: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """``summary.json``'s ``message_bytes``: medians over rounds of the per-client
    median, and totals, of the training exchanges."""
    blocks = [r["message_bytes"] for r in rounds if r.get("message_bytes")]
    if not blocks:
        return None

    def median(key: str) -> float | None:
        values = [b["train"][key] for b in blocks if b["train"][key] is not None]
        return statistics.median(values) if values else None

    return {
        "update_encoding": blocks[-1]["update_encoding"],
        "rounds": len(blocks),
        "up_per_client_per_round_median": median("up_per_client_median"),
        "down_per_client_per_round_median": median("down_per_client_median"),
        "up_total": sum(b["train"]["up_total"] for b in blocks),
        "down_total": sum(b["train"]["down_total"] for b in blocks),
    }
