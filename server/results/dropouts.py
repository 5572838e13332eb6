"""Which instructed nodes gave a round nothing, and why, as the operator reads it.

A node drops out of a round when it was sent an instruction and then

* ``timeout``: no reply came before the round's deadline (a frozen node, a
  stalled link, a crashed node whose heartbeat has not lapsed yet);
* ``link``: Flower answered for it: the node stopped heartbeating (its link went
  down, or it crashed) or its message expired;
* ``refused``: it replied and the server refused the reply (``rejected``);
* ``error``: it replied with any other Flower error (its ClientApp crashed).

A node that replied with a status of its own (trained, a budget or policy
refusal, a data or ledger error) did not drop out: its reply says why.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from common.wire.reply_fields import Status
from server.results.client_outcomes import ClientOutcome

REASONS = ("timeout", "link", "refused", "error")
# Flower 1.42's reasons for replies it makes up (flwr/server/superlink/linkstate/utils.py)
_LINK_MARKS = ("Node Unavailable", "Message Unavailable")


def drop_reason(outcome: ClientOutcome | None) -> str | None:
    """Why the node gave nothing (:data:`REASONS`), or None when its reply counts."""
    if outcome is None:
        return "timeout"
    if outcome.status is Status.REJECTED:
        return "refused"
    if outcome.status is Status.ERROR:
        reason = outcome.reason or ""
        return "link" if any(mark in reason for mark in _LINK_MARKS) else "error"
    return None


def dropouts(
    instructed: Iterable[int],
    outcomes: Iterable[ClientOutcome],
    partitions: Mapping[int, int | None],
    unavailable: Mapping[int, str] | None = None,
) -> list[dict[str, Any]]:
    """``rounds.jsonl``'s ``dropped``: each instructed node that gave nothing, with
    its partition (when it ever said) and reason, in node order.

    ``unavailable`` holds the errors Flower's SuperLink replied on a node's behalf
    (``CountingGrid.unavailable``, which also readdresses those replies to the node):
    a node without an outcome of its own gets one from it.
    """
    by_node = {o.node_id: o for o in outcomes}
    for node, reason in (unavailable or {}).items():
        by_node.setdefault(node, ClientOutcome(node, Status.ERROR, reason=reason))
    dropped = []
    for node in sorted(set(instructed)):
        outcome = by_node.get(node)
        reason = drop_reason(outcome)
        if reason is not None:
            dropped.append(
                {
                    "node_id": node,
                    "partition_id": partitions.get(node),
                    "reason": reason,
                    "detail": (outcome.reason if outcome else None) or None,
                }
            )
    return dropped


def dropouts_text(dropped: list[dict[str, Any]]) -> str:
    """The round line's words for them: ``dropped 2: node 81 (partition 3) link, ...``."""
    if not dropped:
        return ""
    names = []
    for d in dropped:
        where = f" (partition {d['partition_id']})" if d["partition_id"] is not None else ""
        names.append(f"node {d['node_id']}{where} {d['reason']}")
    return f" | dropped {len(dropped)}: " + ", ".join(names)


def count_dropouts(rounds: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """``summary.json``'s ``dropped_nodes``: drop-outs over every round, by reason."""
    counts = dict.fromkeys(REASONS, 0)
    for record in rounds:
        for d in record.get("dropped") or ():
            counts[d["reason"]] = counts.get(d["reason"], 0) + 1
    return counts
