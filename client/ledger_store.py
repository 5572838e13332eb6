"""Where the client's privacy ledger lives between rounds.

In simulation it lives in ``context.state``. On a real node (``state-dir`` set) the
file ``<state-dir>/privacy-ledger.json`` is the source of truth: each message runs
in a fresh process and the SuperNode keeps ``context.state`` only in memory. The
file is read at the start of every round and replaced atomically (temp file,
fsync, rename, fsync of the folder) before an update leaves the node. A file that
cannot be read is never treated as "nothing spent": the client fails closed.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import ConfigRecord, Context

from client.node_settings import NodeSettings
from common.atomic_files import atomic_write_bytes
from common.privacy_ledger import LedgerError, PrivacyLedger


class LedgerMissing(LedgerError):
    """The ledger file vanished after this node trained in this run."""


STATE_KEY = "privfed-ledger"
LEDGER_FILE = "privacy-ledger.json"
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


@contextmanager
def ledger_lock(node: NodeSettings) -> Iterator[None]:
    """Hold the node's ledger exclusively from reading it to storing the new one.

    Flower may run two ClientApp processes for one node at once (two runs, or two
    messages); without the lock both would read the same ledger, both train, and
    the later write would drop the other's spend. A simulated node (no state
    folder) keeps its ledger in ``context.state``, which Flower serialises.
    """
    if node.state_dir is None:
        yield
        return
    path = Path(node.state_dir).expanduser() / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks until the other round has stored
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_ledger(
    context: Context, node: NodeSettings, accountant: str, delta: float
) -> PrivacyLedger:
    """The stored ledger, or an empty one at ``delta`` for a node that never trained.

    ε is reported under ``accountant`` over the whole history, always at the δ the
    ledger was created with (the node's policy δ): a stored ledger keeps its δ.
    """
    in_state = STATE_KEY in context.state.config_records
    if node.state_dir is not None:
        path = ledger_path(node.state_dir)
        if path.exists():
            return read_ledger_file(path).with_accountant(accountant)
        if in_state:
            raise LedgerMissing(
                f"privacy ledger {path} is missing although this node has trained "
                "in this run; refusing to restart its privacy accounting from zero"
            )
        return PrivacyLedger(accountant, delta)
    if not in_state:
        return PrivacyLedger(accountant, delta)
    ledger = PrivacyLedger.from_json(str(context.state.config_records[STATE_KEY]["json"]))
    return ledger.with_accountant(accountant)


def store_ledger(context: Context, ledger: PrivacyLedger, node: NodeSettings) -> None:
    """Persist the ledger (to disk first on a real node), then into ``context.state``."""
    if node.state_dir is not None:
        write_ledger_file(ledger_path(node.state_dir), ledger)
    context.state.config_records[STATE_KEY] = ConfigRecord({"json": ledger.to_json()})


def public_reason(error: LedgerError) -> str:
    """What a ``ledger-error`` reply says: the kind of failure, not the file's content.

    The full message (path, parse error, values) stays in the node's log: a parse
    error can quote a ledger the policy does not release.
    """
    if isinstance(error, LedgerMissing):
        return (
            f"{LEDGER_FILE} is missing although this node trained in this run; it "
            "refuses to restart its privacy accounting from zero"
        )
    return (
        f"{LEDGER_FILE} is unreadable or corrupt; this node refuses to train (see its log)"
    )
