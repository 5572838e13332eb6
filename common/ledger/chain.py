"""A hash chain over a node's stored ledgers, and the fingerprint a server witnesses.

A ledger only grows. Each time a node stores its ledger it adds one link to a
SHA-256 chain: ``head_k = SHA-256(head_{k-1} ‖ SHA-256(ledger content))``, where
``head_0`` commits to a random salt that never leaves the node. So:

- two ledgers with the same salt are one lineage, and the one whose heads extend
  the other's is the newer; anything else has diverged;
- the newest head and the chain length (one link per stored round) form the
  *fingerprint* the node reports and the server witnesses. Without the salt a head
  says nothing about the history (which would reveal the shard size through q and
  steps), and the length counts stored rounds, which the servers saw anyway.

The chain detects accidental rollback and deletion, and lets a server notice a
node that reports less than it did before; it is not a signature: the device's
owner, who holds the salt, can always rewrite their own files (docs/edge-clients.md).
The protocol keys both sides read are declared here.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.ledger.privacy_ledger import LedgerError, PrivacyLedger

CHAIN_TAG = b"privfed-ledger-chain/1\0"
RECORD_FORMAT = "privfed-ledger-head/1"

# Reply fields (node -> server) and train-config fields (server -> node).
REPLY_HEAD_KEY = "ledger-head"
REPLY_LENGTH_KEY = "ledger-length"
WITNESS_HEAD_KEY = "witnessed-ledger-head"
WITNESS_LENGTH_KEY = "witnessed-ledger-length"

_HEX64 = re.compile(r"[0-9a-f]{64}")


def _hex64(value: object, what: str) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise LedgerError(f"{what} must be 64 lowercase hex digits, got {value!r}")
    return value


def content_digest(ledger: PrivacyLedger) -> bytes:
    """SHA-256 of what a ledger has spent (δ, history, rounds, runs), not how it reports."""
    data = {
        "delta": ledger.delta,
        "history": [list(e.as_tuple()) for e in ledger.entries],
        "rounds": list(ledger.rounds),
        "runs": list(ledger.runs),
    }
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).digest()


@dataclass(frozen=True)
class LedgerFingerprint:
    """A chain head and its length: what a node reports and a server witnesses."""

    head: str
    length: int

    def __post_init__(self) -> None:
        _hex64(self.head, "ledger head")
        if isinstance(self.length, bool) or not isinstance(self.length, int):
            raise LedgerError(f"ledger length must be an integer, got {self.length!r}")
        if self.length < 1:
            raise LedgerError(f"ledger length must be >= 1, got {self.length}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (the node's record file, the server's witness file)."""
        return {"head": self.head, "length": self.length}

    @classmethod
    def from_dict(cls, data: Any) -> LedgerFingerprint:
        """Parse :meth:`to_dict` output; anything malformed raises LedgerError."""
        if not isinstance(data, Mapping):
            raise LedgerError(f"a ledger fingerprint is an object, got {data!r}")
        return cls(data.get("head"), data.get("length"))  # type: ignore[arg-type]

    def to_reply(self) -> dict[str, str | int]:
        """The reply fields that carry it (declared in :mod:`common.wire.reply_fields`)."""
        return {REPLY_HEAD_KEY: self.head, REPLY_LENGTH_KEY: self.length}

    @classmethod
    def from_reply(cls, raw: Mapping[str, Any]) -> LedgerFingerprint | None:
        """The fingerprint in a reply's fields: both fields, or neither."""
        head, length = raw.get(REPLY_HEAD_KEY), raw.get(REPLY_LENGTH_KEY)
        if head is None and length is None:
            return None
        return cls(head, length)  # type: ignore[arg-type]


@dataclass(frozen=True)
class LedgerChain:
    """The salt and every head of one ledger's chain, oldest first."""

    salt: str
    heads: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _hex64(self.salt, "ledger chain salt")
        for head in self.heads:
            _hex64(head, "ledger chain head")

    @classmethod
    def new(cls) -> LedgerChain:
        """A chain for a new ledger, salted from OS entropy."""
        return cls(secrets.token_hex(32))

    @property
    def length(self) -> int:
        """Links so far: one per stored round."""
        return len(self.heads)

    def _head_at(self, length: int) -> str:
        if length == 0:
            return hashlib.sha256(CHAIN_TAG + bytes.fromhex(self.salt)).hexdigest()
        return self.heads[length - 1]

    @property
    def fingerprint(self) -> LedgerFingerprint | None:
        """The newest head and the length; ``None`` before the first store."""
        return LedgerFingerprint(self.heads[-1], self.length) if self.heads else None

    def extended(self, ledger: PrivacyLedger) -> LedgerChain:
        """The chain with one more link, committing to ``ledger``."""
        link = bytes.fromhex(self._head_at(self.length)) + content_digest(ledger)
        return LedgerChain(self.salt, (*self.heads, hashlib.sha256(link).hexdigest()))

    def commits_to(self, ledger: PrivacyLedger) -> bool:
        """True when the newest link was made from exactly this ledger's content."""
        if not self.heads:
            return False
        link = bytes.fromhex(self._head_at(self.length - 1)) + content_digest(ledger)
        return hashlib.sha256(link).hexdigest() == self.heads[-1]

    def passes_through(self, seen: LedgerFingerprint) -> bool:
        """True when this chain is ``seen`` or grew from it."""
        return seen.length <= self.length and self.heads[seen.length - 1] == seen.head

    def grew_from(self, older: LedgerChain) -> bool:
        """True when this chain is ``older`` or extends it (same salt, same heads)."""
        return (
            self.salt == older.salt
            and older.length <= self.length
            and self.heads[: older.length] == older.heads
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, stored beside the ledger in its file."""
        return {"salt": self.salt, "heads": list(self.heads)}

    @classmethod
    def from_dict(cls, data: Any) -> LedgerChain:
        """Parse :meth:`to_dict` output; anything malformed raises LedgerError."""
        if not isinstance(data, Mapping) or not isinstance(data.get("heads"), list):
            raise LedgerError("ledger chain must be an object with 'salt' and 'heads'")
        return cls(data.get("salt"), tuple(data["heads"]))  # type: ignore[arg-type]


def witness_config(seen: LedgerFingerprint) -> dict[str, str | int]:
    """The train-config entries by which a server tells a node what it saw last."""
    return {WITNESS_HEAD_KEY: seen.head, WITNESS_LENGTH_KEY: seen.length}


def witness_from_config(config: Mapping[str, Any]) -> LedgerFingerprint | None:
    """The fingerprint a train instruction says the server witnessed, if any."""
    head, length = config.get(WITNESS_HEAD_KEY), config.get(WITNESS_LENGTH_KEY)
    if head is None and length is None:
        return None
    try:
        return LedgerFingerprint(head, length)  # type: ignore[arg-type]
    except LedgerError as exc:
        raise LedgerError(
            f"train instruction fields {WITNESS_HEAD_KEY!r}/{WITNESS_LENGTH_KEY!r}: {exc}"
        ) from None
