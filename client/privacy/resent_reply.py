"""Answer a round the server asks again with the update already charged for it.

A SuperLink killed mid-round and resumed from its checkpoint asks the same round
again, with the same global model. A node that trained that round has already
stored its ledger step (before the update left, or before the crash stopped it
leaving), so training it anew would charge the round twice and release a second,
independent noisy update. Instead the node keeps its last sample-level reply on
disk beside its ledger and, when the same request comes again, sends that reply
once more: re-sending a released update is post-processing, so nothing new is
spent and the ledger stays one step per round (docs/faults.md, "SuperLink killed").

"The same request" is the round number, every global array (names and bytes) and
the run configuration, except the keys that only say how the server was started
(``RESTART_KEYS``). Anything else differs, and the node trains and charges as for
any round. The journal is written after the ledger step it belongs to, so a crash
between the two costs a second charge, never a free update; and it is replayed only
while the ledger still ends with that step.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from google.protobuf.message import DecodeError

from common.atomic_files import atomic_write_bytes
from common.ledger.privacy_ledger import PrivacyLedger
from common.wire.reply_fields import ARRAYS_KEY

log = logging.getLogger("privfed.client")

JOURNAL_FILE = "last-reply.bin"
FORMAT = "privfed-last-reply/1"
# Run-config keys that say how the ServerApp was (re)started, not what a node computes.
RESTART_KEYS = frozenset({"resume", "results-dir"})


def request_digest(msg: Message, run_config: Mapping[str, Any]) -> str:
    """SHA-256 over the round, the global arrays in order and the run configuration."""
    h = hashlib.sha256()
    h.update(f"round={int(msg.content['config']['server-round'])}\n".encode())
    for key, array in msg.content[ARRAYS_KEY].items():
        h.update(f"array {key} {array.dtype} {list(array.shape)}\n".encode())
        h.update(array.data)
    settings = {k: v for k, v in run_config.items() if k not in RESTART_KEYS}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _journal(ledger_dir: str) -> Path:
    return Path(ledger_dir).expanduser() / JOURNAL_FILE


def store_reply(
    ledger_dir: str | None,
    digest: str,
    server_round: int,
    ledger: PrivacyLedger,
    content: RecordDict,
) -> None:
    """Keep ``content`` (the reply about to leave) for a repeat of this request.

    Call after the ledger holding this round's step is stored; ``ledger`` is that
    ledger. Without a ledger folder (a run without results) there is nothing to
    resume, so nothing is kept.
    """
    if ledger_dir is None:
        return
    header = {
        "format": FORMAT,
        "digest": digest,
        "round": server_round,
        "ledger_rounds": len(ledger.rounds),
    }
    body = recorddict_to_proto(content).SerializeToString()
    data = json.dumps(header, sort_keys=True).encode() + b"\n" + body
    atomic_write_bytes(_journal(ledger_dir), data, mode=0o600)


def stored_reply(
    ledger_dir: str | None, digest: str, server_round: int, ledger: PrivacyLedger
) -> RecordDict | None:
    """The reply kept for exactly this request, while the ledger still ends with its
    step; else ``None`` (train as usual). An unreadable journal is ignored with a
    warning: training again is the conservative answer (one more charged step)."""
    if ledger_dir is None:
        return None
    path = _journal(ledger_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("reply journal %s is unreadable (%s); training the round", path, exc)
        return None
    head, _, body = data.partition(b"\n")
    try:
        header = json.loads(head)
        matches = (
            header.get("format") == FORMAT
            and header.get("digest") == digest
            and header.get("round") == server_round
        )
        if not matches:
            return None
        if (
            header.get("ledger_rounds") != len(ledger.rounds)
            or not ledger.rounds
            or ledger.rounds[-1] != server_round
        ):
            log.info(
                "reply journal %s is for round %d but the ledger has moved on; "
                "training the round", path, server_round,
            )  # fmt: skip
            return None
        return recorddict_from_proto(ProtoRecordDict.FromString(body))
    except (ValueError, TypeError, AttributeError, DecodeError) as exc:
        log.warning("reply journal %s is corrupt (%s); training the round", path, exc)
        return None
