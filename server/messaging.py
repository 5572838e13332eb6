"""Messages out, replies in: one exchange with the nodes, polled briskly."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    first_poll: float = 0.02,
    max_poll: float = 0.5,
) -> list[Message]:
    """Push ``messages`` and collect their replies until all are in or ``timeout``.

    Like ``Grid.send_and_receive``, but polls from ``first_poll`` seconds, growing
    to ``max_poll``: Flower's deployment grid sleeps a fixed 3 s between pulls,
    which would add up to 3 s of idle time to every exchange.
    """
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


def content_bytes(content: RecordDict) -> int:
    """Serialised size of a message's content: Flower sends a message as the tree of
    its objects (records, arrays, chunks), each deflated to bytes."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
