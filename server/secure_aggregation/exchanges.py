"""The plumbing of one secure-aggregation round: exchanges, their bytes and seconds,
and the checks between stages (who was lost, who can still be rebuilt)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from common.secure_aggregation.distributed_dp import QuantisationPlan
from common.secure_aggregation.protocol import SECAGG_KEY, Stage
from server.messaging import content_bytes, exchange
from server.secure_aggregation.layout import Layout, SecAggResult


class RoundExchanges:
    """One round's exchanges through ``grid`` and what they cost."""

    def __init__(
        self,
        grid: Grid,
        server_round: int,
        layout: Layout,
        plan: QuantisationPlan,
        rotation_seed: bytes,
        stage_timeout: float,
        train_timeout: float,
        clock: Callable[[], float],
    ) -> None:
        self.grid = grid
        self.round = server_round
        self.layout = layout
        self.plan = plan
        self.rotation_seed = rotation_seed
        self.stage_timeout = stage_timeout
        self.train_timeout = train_timeout
        self.clock = clock
        self.result = SecAggResult(None, None, {}, [], [])

    # -- plumbing -----------------------------------------------------------------------
    def _exchange(
        self, stage: Stage, contents: dict[int, RecordDict], timeout: float
    ) -> dict[int, Message]:
        messages = [
            Message(content, dst_node_id=node, message_type=stage.message_type)
            for node, content in contents.items()
        ]
        totals = self.result.stage_bytes.setdefault(stage.value, {"down": 0, "up": 0})
        for node, content in contents.items():
            size = content_bytes(content)
            self.result.bytes_down[node] = self.result.bytes_down.get(node, 0) + size
            totals["down"] += size
        started = self.clock()
        replies = exchange(self.grid, messages, timeout)
        elapsed = self.clock() - started
        self.result.exchange_seconds += elapsed
        self.result.stage_seconds[stage.value] = round(elapsed, 4)
        answered: dict[int, Message] = {}
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if node not in contents or node in answered:
                continue
            if reply.has_error():
                self.result.errors.append(reply)
                continue
            size = content_bytes(reply.content)
            self.result.bytes_up[node] = self.result.bytes_up.get(node, 0) + size
            totals["up"] += size
            answered[node] = reply
        return answered

    def _identity_bytes(self, what: str, size: int) -> None:
        self.result.identity_bytes[what] = self.result.identity_bytes.get(what, 0) + size

    def _stage_records(self, stage: Stage, replies: dict[int, Message]) -> dict[int, Any]:
        """The ``secagg`` records of the replies; a reply with a report instead (a
        refusal or a node error) is kept for the round's outcomes."""
        records = {}
        for node, reply in replies.items():
            if SECAGG_KEY in reply.content.config_records:
                records[node] = reply.content.config_records[SECAGG_KEY]
            else:
                self.result.answers.append(reply)
        return records

    def _fail(self, why: str) -> SecAggResult:
        self.result.failure = f"round {self.round}: secure aggregation failed: {why}"
        self.result.total = None
        return self.result

    def _lost(self, stage: Stage, before: set[int], after: set[int]) -> None:
        self.result.dropped[stage.value] = sorted(before - after)

    def _short(self, alive: set[int], what: str) -> str | None:
        """Why too few nodes are left to ever reach the round's minimum, or ``None``."""
        minimum = self.layout.min_contributors
        if len(alive) < minimum:
            return (
                f"{len(alive)} clients {what}, fewer than the round's minimum of {minimum}"
            )
        return None

    def _reachable(self, alive: set[int]) -> str | None:
        """Why some node can no longer have its secrets rebuilt (fewer than t live
        neighbours), or ``None``."""
        t = self.layout.threshold
        for node in sorted(alive):
            live = alive.intersection(self.layout.neighbours[node])
            if len(live) < t:
                return f"node {node} has {len(live)} live neighbours, fewer than t = {t}"
        return None
