"""The server's witness of every node's ledger: the newest fingerprint each reported.

A node with a state folder reports its ledger's fingerprint (hash-chain head and
length, :mod:`common.ledger.chain`) with every ``trained`` and ``budget-exhausted``
reply. The server keeps the newest one per node in ``ledger-witness.json`` beside
the run folders (the parent of the run's results folder: ``results/`` by default),
so the witness spans runs, and sends it back in every train instruction. A node
whose ledger is behind what the server saw it report refuses to train
(``ledger-error``); a reply that reports less than the server saw anyway (a client
that ignores the witness) counts as failed and is not aggregated.

Nodes are known by their Flower node id. It is stable for an authenticated
SuperNode (the id belongs to its registered key) on a SuperLink that keeps its
state (``--database``); a node that comes back under a new id is a new node to
the witness (docs/edge-clients.md, "Ledger integrity").
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore import log

from common.atomic_files import atomic_write_bytes
from common.ledger.chain import LedgerFingerprint, witness_config
from common.wire.reply_fields import Status
from server.results.client_outcomes import ClientOutcome

WITNESS_FILE = "ledger-witness.json"
WITNESS_FORMAT = "privfed-ledger-witness/1"


class WitnessError(RuntimeError):
    """The witness file is unreadable or malformed."""


def _read(path: Path) -> dict[int, dict[str, Any]]:
    """The file's entries by node id, each with a valid fingerprint; a bad file raises."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != WITNESS_FORMAT:
            raise ValueError(f"not a {WITNESS_FORMAT} file")
        entries = {int(node): dict(entry) for node, entry in data["nodes"].items()}
        for entry in entries.values():
            LedgerFingerprint.from_dict(entry)
        return entries
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise WitnessError(
            f"ledger witness {path} is unreadable or malformed ({exc}); fix or move it "
            "(it holds what this server saw each node's ledger report)"
        ) from exc


def _fingerprints(entries: dict[int, dict[str, Any]]) -> dict[int, LedgerFingerprint]:
    return {node: LedgerFingerprint.from_dict(e) for node, e in entries.items()}


class LedgerWitness:
    """What this server saw each node's ledger report, kept in one file across runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen = _fingerprints(_read(path))

    @classmethod
    def beside(cls, run_dir: Path) -> LedgerWitness:
        """The witness shared by every run folder in ``run_dir``'s parent."""
        return cls(run_dir.parent / WITNESS_FILE)

    def annotation(self, node_id: int) -> dict[str, Any]:
        """The config entries telling ``node_id`` the fingerprint seen from it."""
        seen = self.seen.get(node_id)
        return witness_config(seen) if seen is not None else {}

    def annotate(self, messages: Iterable[Message], config_key: str) -> list[Message]:
        """Give each train instruction's ``config_key`` record the node's fingerprint."""
        out = []
        for message in messages:
            extra = self.annotation(int(message.metadata.dst_node_id))
            if extra:
                content = RecordDict(dict(message.content.items()))
                config = dict(message.content.config_records[config_key])
                content[config_key] = ConfigRecord({**config, **extra})
                message = Message(
                    content,
                    dst_node_id=message.metadata.dst_node_id,
                    message_type=message.metadata.message_type,
                )
            out.append(message)
        return out

    def check(
        self, server_round: int, outcomes: list[ClientOutcome]
    ) -> list[ClientOutcome]:
        """Fail replies behind the witness; witness the rest and save the file."""
        checked = [self._vet(server_round, o) for o in outcomes]
        reported = {
            o.node_id: o.fingerprint
            for o in checked
            if o.fingerprint is not None and o.status.counter != "failed"
        }
        if reported:
            self._save(reported, {o.node_id: o.partition_id for o in checked})
        return checked

    def _vet(self, server_round: int, outcome: ClientOutcome) -> ClientOutcome:
        seen = self.seen.get(outcome.node_id)
        if seen is None or outcome.status not in (
            Status.TRAINED,
            Status.BUDGET_EXHAUSTED,
        ):
            return outcome
        now = outcome.fingerprint
        if now is None:
            why = "reported no ledger fingerprint"
        elif now.length < seen.length:
            why = f"reported its ledger at length {now.length}"
        elif now.length == seen.length and now.head != seen.head:
            why = f"reported a different ledger at length {now.length}"
        else:
            return outcome
        reason = (
            f"ledger witness: node {outcome.node_id} {why}, but this server saw it at "
            f"length {seen.length} ({self.path.name}); its reply is not used"
        )
        log(WARNING, "round %d: %s", server_round, reason)
        return dataclasses.replace(outcome, status=Status.ERROR, reason=reason)

    def _save(
        self, reported: dict[int, LedgerFingerprint], partitions: dict[int, int | None]
    ) -> None:
        """Merge with the file (another run may share it) and replace it atomically."""
        stamp = datetime.now(UTC).isoformat()
        with self._lock():
            entries = _read(self.path)
            for node, now in reported.items():
                old = entries.get(node)
                if old is None or now.length >= int(old["length"]):
                    entries[node] = {
                        **now.to_dict(),
                        "partition_id": partitions.get(node),
                        "witnessed_at": stamp,
                    }
            self.seen = _fingerprints(entries)
            nodes = {str(node): entry for node, entry in sorted(entries.items())}
            data = {"format": WITNESS_FORMAT, "nodes": nodes}
            text = json.dumps(data, indent=2, sort_keys=True) + "\n"
            atomic_write_bytes(self.path, text.encode("utf-8"))

    @contextmanager
    def _lock(self) -> Iterator[None]:
        lock = self.path.with_name(f".{self.path.name}.lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
