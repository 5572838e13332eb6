"""What each client reported in a training round, as the server records it.

The reply is parsed once, by :meth:`common.wire.reply.TrainReport.from_content`. Every
privacy fact the server records (ε, δ, accountant, steps) is computed here from the
released ledger object, never taken from a number the client typed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from flwr.app import Message

from common.ledger.chain import LedgerFingerprint
from common.ledger.privacy_ledger import PrivacyLedger
from common.wire.reply import TrainReport
from common.wire.reply_fields import ReplyError, Status


def partition_key(partition_id: int | None, node_id: int) -> str:
    """How results name a client: its partition, or ``node-<id>`` for a node that
    serves its own data (partition -1) or did not say."""
    if partition_id is None or partition_id < 0:
        return f"node-{node_id}"
    return str(partition_id)


@dataclass(frozen=True)
class ClientOutcome:
    """One node's training reply: status, reason, and its ledger if released."""

    node_id: int
    status: Status
    partition_id: int | None = None
    reason: str | None = None
    ledger: PrivacyLedger | None = None
    client_seconds: float | None = None
    num_examples: int | None = None
    train_loss: float | None = None
    weight: int | None = None  # aggregation weight of a trained reply
    below_clip: bool | None = None  # client-level replies (adaptive clipping's bit)
    masked: bool = False  # a secure-aggregation upload (unmasked only in the sum)
    fingerprint: LedgerFingerprint | None = None  # for the ledger witness
    compressed: bool = False  # its update travels encoded (common/wire/update_codec.py)

    @cached_property
    def epsilon(self) -> float | None:
        """Cumulative ε recomputed from the released ledger (``None`` if not released)."""
        return self.ledger.epsilon() if self.ledger is not None else None

    @property
    def rounds_trained(self) -> int | None:
        """Rounds recorded in the released ledger."""
        return len(self.ledger.rounds) if self.ledger is not None else None

    def to_dict(self) -> dict[str, Any]:
        """The ``rounds.jsonl`` form; an infinite ε (a non-private release) is null, and
        a rejected reply's ledger is not trusted, so none of its privacy facts shows."""
        ledger = self.ledger if self.status is not Status.REJECTED else None
        epsilon = self.epsilon if ledger is not None else None
        return {
            "node_id": self.node_id,
            "partition_id": self.partition_id,
            "status": self.status.value,
            "reason": self.reason,
            "epsilon": epsilon if epsilon is not None and math.isfinite(epsilon) else None,
            "delta": ledger.delta if ledger else None,
            "accountant": ledger.accountant_name if ledger else None,
            "rounds_trained": self.rounds_trained,
            "steps_total": ledger.total_steps if ledger else None,
            "history": ledger.history() if ledger else None,
            "ledger_released": self.ledger is not None,
            "client_seconds": self.client_seconds,
            "num_examples": self.num_examples,
            "train_loss": self.train_loss,
            "aggregation_weight": self.weight,
        }


def outcome_from_reply(reply: Message) -> ClientOutcome:
    """Parse a training reply; a Flower error is an ``error``, an off-contract reply is
    ``rejected`` (the node answered, the server refuses what it sent)."""
    node_id = int(reply.metadata.src_node_id)
    if reply.has_error():
        return ClientOutcome(node_id, Status.ERROR, reason=reply.error.reason)
    try:
        report = TrainReport.from_content(reply.content)
    except ReplyError as exc:
        return ClientOutcome(
            node_id, Status.REJECTED, reason=f"reply breaks the contract: {exc}"
        )
    return ClientOutcome(
        node_id=node_id,
        status=report.status,
        partition_id=report.partition_id,
        reason=report.reason,
        ledger=report.ledger,
        client_seconds=report.client_seconds,
        num_examples=report.num_examples,
        train_loss=report.train_loss,
        weight=(
            report.weight
            if report.status is Status.TRAINED
            and not (report.client_level or report.masked)
            else None
        ),
        below_clip=report.below_clip,
        masked=report.masked,
        fingerprint=report.fingerprint,
        compressed=report.compressed,
    )
