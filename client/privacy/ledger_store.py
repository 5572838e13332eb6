"""Where the client's privacy ledger lives between rounds, and how rollback is caught.

In simulation it lives in ``context.state``, and, when the run has a results folder,
also in ``<results-dir>/nodes/partition-<id>/`` so that a resumed run continues it.
On a real node (``state-dir`` set) the file ``<state-dir>/privacy-ledger.json`` is
the source of truth: each message runs in a fresh process and the SuperNode keeps
``context.state`` only in memory. The file is read at the start of every round and
replaced atomically (temp file, fsync, rename, fsync of the folder) before an update
leaves the node. A file that cannot be read is never treated as "nothing spent": the
client fails closed.

A ledger only grows: every store adds a link to its hash chain
(:mod:`common.ledger.chain`, kept in the ledger file), and then writes the chain's
head and length to ``privacy-ledger.head.json``, the node's record of the newest
ledger it stored. A ledger file older than that record (replaced by an older copy),
or missing while the record exists (deleted), is refused; within a run, the newer
of the file and the run's copy in ``context.state`` wins, and copies that diverged
are refused. A server that witnessed a later ledger catches what a wiped state
folder hides from the node itself (docs/edge-clients.md, "Ledger integrity").
"""

from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from client.node_settings import NodeSettings
from common.atomic_files import atomic_write_bytes
from common.ledger.chain import (
    RECORD_FORMAT,
    LedgerChain,
    LedgerFingerprint,
    witness_from_config,
)
from common.ledger.privacy_ledger import LedgerError, PrivacyLedger
from common.wire.records import record_of

log = logging.getLogger("privfed.client")


class LedgerMissing(LedgerError):
    """The ledger file vanished after this node read or stored it in this run."""


class LedgerIntegrityError(LedgerError):
    """The ledger is older than, or diverged from, one this node or the server saw.

    Its message names files by name only and lengths of the chain, so it is the
    public reason of the ``ledger-error`` reply as it stands.
    """


class LedgerRecordError(LedgerError):
    """The node's record of its newest ledger is unreadable or corrupt."""


STATE_KEY = "privfed-ledger"
LEDGER_FILE = "privacy-ledger.json"
RECORD_FILE = "privacy-ledger.head.json"
LOCK_FILE = "privacy-ledger.lock"


def ledger_path(state_dir: str) -> Path:
    """The ledger file of a node's state folder."""
    return Path(state_dir).expanduser() / LEDGER_FILE


def read_ledger_file(path: Path) -> PrivacyLedger:
    """Parse a ledger file; any problem raises :class:`LedgerError` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"privacy ledger {path} is unreadable: {exc}") from exc
    try:
        return PrivacyLedger.from_json(text)
    except LedgerError as exc:
        raise LedgerError(f"privacy ledger {path} is corrupt: {exc}") from exc


def write_ledger_file(path: Path, ledger: PrivacyLedger) -> None:
    """Replace the ledger file atomically and durably (owner-only)."""
    atomic_write_bytes(path, ledger.to_json().encode("utf-8"), mode=0o600)


def record_path(state_dir: str) -> Path:
    """The node's record of the newest ledger it stored."""
    return Path(state_dir).expanduser() / RECORD_FILE


def read_chained_file(path: Path) -> tuple[PrivacyLedger, LedgerChain | None]:
    """A ledger file and its hash chain (``None`` if written before chains).

    A chain whose newest link does not commit to the file's ledger means the file
    was edited or pieced together: :class:`LedgerError`, naming the file.
    """
    ledger = read_ledger_file(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if "chain" not in data:
        return ledger, None
    try:
        chain = LedgerChain.from_dict(data["chain"])
    except LedgerError as exc:
        raise LedgerError(f"privacy ledger {path} is corrupt: {exc}") from exc
    if not chain.commits_to(ledger):
        raise LedgerError(
            f"privacy ledger {path} is corrupt: its hash chain does not commit to its "
            "history (edited by hand, or pieced together from two copies)"
        )
    return ledger, chain


def write_chained_file(path: Path, ledger: PrivacyLedger, chain: LedgerChain) -> None:
    """Replace the ledger file, with its chain, atomically and durably (owner-only)."""
    data = {**ledger.to_dict(), "chain": chain.to_dict()}
    atomic_write_bytes(path, json.dumps(data, sort_keys=True).encode("utf-8"), mode=0o600)


def read_record(path: Path) -> LedgerFingerprint:
    """The node's record; any problem raises :class:`LedgerError` naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            raise LedgerError(f"not a {RECORD_FORMAT} record")
        return LedgerFingerprint.from_dict(data)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LedgerRecordError(
            f"ledger record {path} is unreadable or corrupt: {exc}"
        ) from exc


def write_record(path: Path, seen: LedgerFingerprint) -> None:
    """Replace the node's record atomically and durably (owner-only)."""
    data = {"format": RECORD_FORMAT, **seen.to_dict()}
    atomic_write_bytes(path, json.dumps(data, sort_keys=True).encode("utf-8"), mode=0o600)


@contextmanager
def ledger_lock(node: NodeSettings) -> Iterator[None]:
    """Hold the node's ledger exclusively from reading it to storing the new one.

    Flower may run two ClientApp processes for one node at once (two runs, or two
    messages); without the lock both would read the same ledger, both train, and
    the later write would drop the other's spend. A simulated node without a ledger
    folder keeps its ledger in ``context.state``, which Flower serialises.
    """
    if node.ledger_dir is None:
        yield
        return
    path = Path(node.ledger_dir).expanduser() / LOCK_FILE
    try:
        handle = open(path, "a", encoding="utf-8")  # closed by the with below
    except FileNotFoundError:  # a new node: its folder first (not per call: 0.04 ms)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a", encoding="utf-8")
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks until the other round has stored
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


Copy = tuple[PrivacyLedger, LedgerChain | None]  # a ledger and its chain, if chained


def _state_copy(context: Context) -> Copy | None:
    """The ledger (and its chain) this run holds in memory, if it loaded or stored one."""
    record = record_of(context.state, STATE_KEY, ConfigRecord)
    if record is None:
        return None
    ledger = PrivacyLedger.from_json(str(record["json"]))
    if "chain" not in record:  # a ledger from before hash chains, not stored since
        return ledger, None
    return ledger, LedgerChain.from_dict(json.loads(str(record["chain"])))


def _remember(context: Context, ledger: PrivacyLedger, chain: LedgerChain | None) -> None:
    values = {"json": ledger.to_json()}
    if chain is not None:
        values["chain"] = json.dumps(chain.to_dict())
    context.state[STATE_KEY] = ConfigRecord(values)


def _newer(
    memory: tuple[PrivacyLedger, LedgerChain], disk: tuple[PrivacyLedger, LedgerChain]
) -> tuple[PrivacyLedger, LedgerChain]:
    """The newer of two copies of one ledger (the file when equal); diverged: error."""
    if disk[1].grew_from(memory[1]):
        return disk
    if memory[1].grew_from(disk[1]):
        return memory
    raise LedgerIntegrityError(
        f"the ledger this run holds in memory (length {memory[1].length}) and "
        f"{LEDGER_FILE} (length {disk[1].length}) have diverged: neither grew from "
        "the other; refusing to choose one",
    )


def _behind(chain: LedgerChain | None, seen: LedgerFingerprint, by: str) -> str | None:
    """Why ``chain`` is not ``seen`` or a later version of it, or ``None`` if it is."""
    if chain is not None and chain.passes_through(seen):
        return None
    length = chain.length if chain is not None else 0
    if length < seen.length:
        return (
            f"this node's ledger has length {length}, but {by} saw it at length "
            f"{seen.length}: it was rolled back or deleted; refusing to restart its "
            "privacy accounting from an older ledger"
        )
    return (
        f"this node's ledger (length {length}) has diverged from the one {by} saw at "
        f"length {seen.length}; refusing to train on a ledger of another history"
    )


def _store_files(node: NodeSettings, ledger: PrivacyLedger, chain: LedgerChain) -> None:
    """The ledger first, then the record: a crash between them leaves a lagging record."""
    write_chained_file(ledger_path(node.ledger_dir or ""), ledger, chain)
    seen = chain.fingerprint
    if seen is not None:
        write_record(record_path(node.ledger_dir or ""), seen)


def _from_file(
    path: Path, memory: Copy | None, record: LedgerFingerprint | None
) -> tuple[PrivacyLedger, LedgerChain] | Copy:
    """The file's copy; one without a chain is accepted only where none was ever made."""
    ledger, chain = read_chained_file(path)
    if chain is None and (record is not None or (memory and memory[1] is not None)):
        raise LedgerIntegrityError(
            f"{LEDGER_FILE} has no hash chain although this node has stored chained "
            "ledgers: it was replaced by an old copy; refusing to train"
        )
    return ledger, chain  # a ledger from before hash chains is chained at its next store


def _from_disk(node: NodeSettings, memory: Copy | None) -> Copy | None:
    """The newest ledger of file and memory, checked against the node's own record."""
    path = ledger_path(node.ledger_dir or "")
    record_file = record_path(node.ledger_dir or "")
    record = read_record(record_file) if record_file.exists() else None
    if not path.exists():
        if memory is not None:
            raise LedgerMissing(
                f"privacy ledger {path} is missing although this node read or stored it "
                "in this run; refusing to restart its privacy accounting from zero"
            )
        if record is not None:
            raise LedgerIntegrityError(
                f"{LEDGER_FILE} is missing, but {RECORD_FILE} says this node stored its "
                f"ledger {record.length} time(s): the ledger was deleted; refusing to "
                "restart its privacy accounting from zero"
            )
        return None
    ledger, chain = _from_file(path, memory, record)
    if chain is None:
        return ledger, None
    newest = (ledger, chain)
    if memory is not None and memory[1] is not None:
        newest = _newer((memory[0], memory[1]), newest)
    if record is not None:
        why = _behind(newest[1], record, f"its record {RECORD_FILE}")
        if why is not None:
            raise LedgerIntegrityError(why)
    if newest[1] is not chain:
        log.warning(
            "%s (length %d) is older than the ledger this run holds in memory (length "
            "%d): it was rolled back during the run; the newer ledger wins and is "
            "written back",
            path, chain.length, newest[1].length,
        )  # fmt: skip
        _store_files(node, *newest)
    elif record != chain.fingerprint and chain.fingerprint is not None:
        write_record(record_file, chain.fingerprint)  # none yet, or behind by a crash
    return newest


def witnessed_in(config: Mapping[str, Any]) -> LedgerFingerprint | None:
    """The fingerprint the server says it witnessed for this node, from the train config."""
    try:
        return witness_from_config(config)
    except LedgerError as exc:
        raise LedgerIntegrityError(str(exc)) from None


def load_ledger(
    context: Context,
    node: NodeSettings,
    accountant: str,
    delta: float,
    witnessed: LedgerFingerprint | None = None,
) -> PrivacyLedger:
    """The newest stored ledger, or an empty one at ``delta`` for a node that never trained.

    On a node with a state folder, the newer of the file and this run's copy in
    memory wins; diverged copies, a file older than the node's record, and a ledger
    behind what the server ``witnessed`` raise :class:`LedgerError`. ε is reported
    under ``accountant`` over the whole history, at the δ the ledger was created with.
    """
    memory = _state_copy(context)
    newest = memory if node.ledger_dir is None else _from_disk(node, memory)
    if witnessed is not None:
        why = _behind(newest[1] if newest else None, witnessed, "the server")
        if why is not None:
            raise LedgerIntegrityError(why)
    if newest is None:
        return PrivacyLedger(accountant, delta)
    _remember(context, *newest)
    return newest[0].with_accountant(accountant)


def store_ledger(context: Context, ledger: PrivacyLedger, node: NodeSettings) -> None:
    """Persist the ledger with one more chain link (disk first, then the record and
    ``context.state``); ``ledger`` must extend the one :func:`load_ledger` returned."""
    memory = _state_copy(context)
    previous = memory[1] if memory is not None else None
    chain = (previous or LedgerChain.new()).extended(ledger)
    if node.ledger_dir is not None:
        _store_files(node, ledger, chain)
    _remember(context, ledger, chain)


def reported_fingerprint(context: Context, node: NodeSettings) -> LedgerFingerprint | None:
    """What a node with a durable ledger reports for the server to witness.

    A simulated partition reports nothing: its Flower node id changes with every
    simulation, so a witness keyed by node id cannot follow it across runs (its
    file in the results folder is checked against its own record instead).
    """
    if node.state_dir is None:
        return None
    memory = _state_copy(context)
    chain = memory[1] if memory is not None else None
    return chain.fingerprint if chain is not None else None  # unchained: nothing yet


def public_reason(error: LedgerError) -> str:
    """What a ``ledger-error`` reply says: the kind of failure, not the file's content.

    The full message (path, parse error, values) stays in the node's log: a parse
    error can quote a ledger the policy does not release.
    """
    if isinstance(error, LedgerIntegrityError):
        return str(error)
    if isinstance(error, LedgerRecordError):
        return f"{RECORD_FILE} is unreadable or corrupt; this node refuses to train"
    if isinstance(error, LedgerMissing):
        return (
            f"{LEDGER_FILE} is missing although this node read or stored it in this run; "
            "it refuses to restart its privacy accounting from zero"
        )
    return (
        f"{LEDGER_FILE} is unreadable or corrupt; this node refuses to train (see its log)"
    )
