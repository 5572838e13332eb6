"""A Grid that hands each message to its node's ClientApp in this process."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Message, MessageType

import client.app as client_app
from tests.helpers.messages import make_message


class InProcessGrid:
    """Hands each message to its node's ClientApp in this process (no transport)."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts = contexts
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            delivered = make_message(message.content, message.metadata.message_type, node)
            handler = (
                client_app.train
                if message.metadata.message_type == MessageType.TRAIN
                else client_app.evaluate
            )
            self.replies[delivered.metadata.message_id] = handler(
                delivered, self.contexts[node]
            )
            ids.append(delivered.metadata.message_id)
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]
