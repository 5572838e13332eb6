"""Reports a client builds and the server parses, checked against the declared fields.

The fields themselves, with what protects each, are declared once in
:mod:`common.wire.reply_fields`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from common.ledger.chain import REPLY_HEAD_KEY, REPLY_LENGTH_KEY, LedgerFingerprint
from common.ledger.privacy_ledger import LedgerError, PrivacyLedger
from common.wire.records import keys_of, record_of
from common.wire.reply_fields import (
    _ALL_EVALUATE,
    _ALL_TRAIN,
    _REASONED,
    ARRAY_KEYS,
    COMPRESSED_KEYS,
    EVAL_METRICS,
    EVALUATE_FIELDS,
    MASKED_KEY,
    REPORT_KEY,
    TRAIN_FIELDS,
    ReplyError,
    ReplyField,
    Status,
    arrays_key,
)


def _sent(declared: tuple[ReplyField, ...], status: Status) -> set[str]:
    """The report keys (ConfigRecord) a ``status`` reply may carry; arrays travel apart."""
    array_keys = ARRAY_KEYS
    return {f.key for f in declared if status in f.statuses and f.key not in array_keys}


def _check_keys(declared: tuple[ReplyField, ...], status: Status, keys: set[str]) -> None:
    extra = sorted(keys - _sent(declared, status))
    if extra:
        raise ReplyError(f"a {status.value!r} reply may not carry {', '.join(extra)}")


def _report(declared: tuple[ReplyField, ...], values: dict[str, Any]) -> ConfigRecord:
    status = Status(values["status"])
    present = {k: v for k, v in values.items() if v is not None}
    _check_keys(declared, status, set(present))
    return ConfigRecord(present)


def _read_report(
    content: RecordDict, declared: tuple[ReplyField, ...], allowed: tuple[Status, ...]
) -> tuple[dict[str, Any], Status, int]:
    """The report's fields, its status and partition id, checked against ``declared``."""
    report = record_of(content, REPORT_KEY, ConfigRecord)
    if report is None:
        raise ReplyError(f"reply has no {REPORT_KEY!r} record")
    raw = dict(report)
    try:
        status = Status(str(raw.get("status")))
    except ValueError:
        raise ReplyError(f"unknown reply status {raw.get('status')!r}") from None
    if status not in allowed:
        raise ReplyError(f"status {status.value!r} is not allowed in this reply")
    _check_keys(declared, status, set(raw))
    partition = _number(raw, "partition-id", int)
    if partition is None:
        raise ReplyError("reply lacks 'partition-id'")
    return raw, status, partition


def _number(raw: dict[str, Any], key: str, kind: type) -> Any:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReplyError(f"reply field {key!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ReplyError(f"reply field {key!r} must be finite, got {value!r}")
    return kind(value)


@dataclass(frozen=True)
class TrainReport:
    """A training reply. Build it with one of the status constructors."""

    status: Status
    partition_id: int
    reason: str | None = None
    ledger: PrivacyLedger | None = None
    client_seconds: float | None = None
    num_examples: int | None = None
    train_loss: float | None = None
    planning_records: int | None = None
    below_clip: bool | None = None  # set on client-level replies only
    masked: bool = False  # a secure-aggregation upload (its arrays: MASKED_KEY)
    fingerprint: LedgerFingerprint | None = None  # a durable ledger's chain head
    compressed: bool = False  # its update travels encoded (COMPRESSED_KEYS)

    def __post_init__(self) -> None:
        if self.status in _REASONED and not self.reason:
            raise ReplyError(f"a {self.status.value!r} reply needs a reason")
        _check_keys(TRAIN_FIELDS, self.status, set(self._fields()))
        if self.masked and self.below_clip is not None:
            raise ReplyError("a masked upload carries no clip bit (fixed clipping only)")
        if self.compressed and (self.masked or self.status is not Status.TRAINED):
            raise ReplyError("only a trained plaintext update travels compressed")
        if self.client_level or self.masked:
            if self.planning_records is not None or self.num_examples is not None:
                raise ReplyError("a client-level update carries no weight (equal weights)")
        elif self.status is Status.TRAINED:
            weights = [
                w for w in (self.planning_records, self.num_examples) if w is not None
            ]
            if len(weights) != 1 or weights[0] < 1:
                raise ReplyError(
                    "a 'trained' reply carries exactly one weight >= 1: planning-records "
                    "(private) or num-examples (non-private)"
                )

    @property
    def weight(self) -> int:
        """The update's aggregation weight (planning count, or records if non-private)."""
        return self.planning_records or self.num_examples or 0

    @property
    def client_level(self) -> bool:
        """A clipped, un-noised model change for DP-FedAvg (``privacy-mode = 'client'``)."""
        return self.below_clip is not None

    @property
    def arrays_key(self) -> str:
        """Where this reply's arrays travel: the masked upload, the clipped change, or
        the weights."""
        if self.masked:
            return MASKED_KEY
        return arrays_key(self.client_level, self.compressed)

    def with_fingerprint(self, fingerprint: LedgerFingerprint | None) -> TrainReport:
        """The same report, carrying the node's ledger fingerprint for the witness."""
        if fingerprint == self.fingerprint:
            return self  # e.g. a simulated partition's: none to report
        return dataclasses.replace(self, fingerprint=fingerprint)

    def with_compressed_update(self) -> TrainReport:
        """The same report, its update encoded (:mod:`common.wire.update_codec`)."""
        return dataclasses.replace(self, compressed=True)

    # -- constructors, one per status ---------------------------------------------
    @classmethod
    def trained(
        cls,
        partition_id: int,
        planning_records: int,
        ledger: PrivacyLedger | None,
        client_seconds: float | None,
    ) -> TrainReport:
        """A private round; ``ledger``/``client_seconds`` are ``None`` unless released."""
        return cls(
            Status.TRAINED, partition_id, None, ledger, client_seconds,
            planning_records=planning_records,
        )  # fmt: skip

    @classmethod
    def trained_non_private(
        cls, partition_id: int, num_examples: int, train_loss: float
    ) -> TrainReport:
        """A non-private round the policy allows (allow-non-private): counts and loss."""
        return cls(
            Status.TRAINED, partition_id, num_examples=num_examples, train_loss=train_loss
        )

    @classmethod
    def client_update(
        cls,
        partition_id: int,
        below_clip: bool,
        ledger: PrivacyLedger | None,
        client_seconds: float | None,
    ) -> TrainReport:
        """A client-level round (policy: allow-client-level); the change travels apart."""
        return cls(
            Status.TRAINED, partition_id, None, ledger, client_seconds,
            below_clip=bool(below_clip),
        )  # fmt: skip

    @classmethod
    def masked_update(
        cls,
        partition_id: int,
        ledger: PrivacyLedger | None,
        client_seconds: float | None,
    ) -> TrainReport:
        """A secure-aggregation upload (policy: allow-secure-aggregation)."""
        return cls(Status.TRAINED, partition_id, None, ledger, client_seconds, masked=True)

    @classmethod
    def budget_exhausted(
        cls, partition_id: int, ledger: PrivacyLedger | None
    ) -> TrainReport:
        """The round would take the node past its ε budget; nothing trained."""
        return cls(Status.BUDGET_EXHAUSTED, partition_id, ledger=ledger)

    @classmethod
    def policy_refused(cls, partition_id: int, reason: str) -> TrainReport:
        """The run asks for something the node's privacy policy does not allow."""
        return cls(Status.POLICY_REFUSED, partition_id, reason=reason)

    @classmethod
    def ledger_error(cls, partition_id: int, reason: str) -> TrainReport:
        """The ledger could not be read: fail closed."""
        return cls(Status.LEDGER_ERROR, partition_id, reason=reason)

    @classmethod
    def data_error(cls, partition_id: int, reason: str) -> TrainReport:
        """The node's data failed its checks: refuse, spend nothing (reason: no values)."""
        return cls(Status.DATA_ERROR, partition_id, reason=reason)

    @classmethod
    def node_error(cls, partition_id: int, reason: str) -> TrainReport:
        """A device failed; ``reason`` names the exception's type, nothing more."""
        return cls(Status.NODE_ERROR, partition_id, reason=reason)

    # -- wire form ----------------------------------------------------------------
    def _fields(self) -> dict[str, Any]:
        """The report's fields this reply carries; the ledger not yet as JSON (each
        report is checked on creation, and a client's report is made up to 3 times)."""
        values = {
            "status": self.status.value,
            "partition-id": self.partition_id,
            "reason": self.reason,
            "ledger": self.ledger,
            "client-seconds": self.client_seconds,
            "num-examples": self.num_examples,
            "train-loss": self.train_loss,
            "planning-records": self.planning_records,
            "below-clip": self.below_clip,
            **(self.fingerprint.to_reply() if self.fingerprint is not None else {}),
        }
        return {k: v for k, v in values.items() if v is not None}

    def _values(self) -> dict[str, Any]:
        """The report's wire values."""
        values = self._fields()
        if self.ledger is not None:
            values["ledger"] = self.ledger.to_json()
        return values

    def to_content(self, arrays: ArrayRecord | None = None) -> RecordDict:
        """The reply's RecordDict; ``arrays`` go with a ``trained`` reply only."""
        if (arrays is not None) != (self.status is Status.TRAINED):
            raise ReplyError("weights travel with a 'trained' reply, and only with it")
        content = RecordDict({REPORT_KEY: _report(TRAIN_FIELDS, self._values())})
        if arrays is not None:
            content[self.arrays_key] = arrays
        return content

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainReport:
        """Parse a training reply; anything off-contract raises :class:`ReplyError`."""
        raw, status, partition = _read_report(content, TRAIN_FIELDS, _ALL_TRAIN)
        below_clip = raw.get("below-clip")
        if below_clip is not None and not isinstance(below_clip, bool):
            raise ReplyError(f"reply field 'below-clip' must be a bool, got {below_clip!r}")
        present = keys_of(content, ArrayRecord) & set(ARRAY_KEYS)
        masked = MASKED_KEY in present
        compressed = bool(present & set(COMPRESSED_KEYS))
        kind = arrays_key(below_clip is not None, compressed)
        expected = {MASKED_KEY if masked and below_clip is None else kind}
        if status is not Status.TRAINED:
            expected = set()
        if present != expected:
            raise ReplyError(
                f"a {status.value!r} reply carries arrays {sorted(present)}, "
                f"expected {sorted(expected)}"
            )
        ledger = None
        if "ledger" in raw:
            try:
                ledger = PrivacyLedger.from_json(str(raw["ledger"]))
            except LedgerError as exc:
                raise ReplyError(f"reply field 'ledger': {exc}") from None
        try:
            fingerprint = LedgerFingerprint.from_reply(raw)
        except LedgerError as exc:
            fields = f"{REPLY_HEAD_KEY!r}/{REPLY_LENGTH_KEY!r}"
            raise ReplyError(f"reply fields {fields}: {exc}") from None
        return cls(
            status=status,
            partition_id=partition,
            reason=str(raw["reason"]) if "reason" in raw else None,
            ledger=ledger,
            client_seconds=_number(raw, "client-seconds", float),
            num_examples=_number(raw, "num-examples", int),
            train_loss=_number(raw, "train-loss", float),
            planning_records=_number(raw, "planning-records", int),
            below_clip=below_clip,
            masked=masked and status is Status.TRAINED,
            fingerprint=fingerprint,
            compressed=compressed and status is Status.TRAINED,
        )


@dataclass(frozen=True)
class EvaluateReport:
    """A federated-evaluation reply: local test metrics, or a policy refusal."""

    status: Status
    partition_id: int
    reason: str | None = None
    num_examples: int | None = None
    scores: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.status is Status.SCORED:
            names = tuple(name for name, _ in self.scores)
            if names != EVAL_METRICS or not (self.num_examples or 0) >= 1:
                raise ReplyError(
                    f"a 'scored' reply needs num-examples >= 1 and {EVAL_METRICS}"
                )
        elif self.status in (Status.POLICY_REFUSED, Status.DATA_ERROR, Status.NODE_ERROR):
            if not self.reason or self.scores or self.num_examples is not None:
                raise ReplyError("a refused evaluation carries a reason and nothing else")
        else:
            raise ReplyError(f"status {self.status.value!r} is not an evaluation reply")

    @classmethod
    def scored(
        cls, partition_id: int, num_examples: int, scores: dict[str, float]
    ) -> EvaluateReport:
        """Metrics of the global model on the local test split (policy opt-in)."""
        ordered = tuple((name, float(scores[name])) for name in EVAL_METRICS)
        return cls(Status.SCORED, partition_id, None, num_examples, ordered)

    @classmethod
    def policy_refused(cls, partition_id: int, reason: str) -> EvaluateReport:
        """The node's policy does not release local evaluation metrics."""
        return cls(Status.POLICY_REFUSED, partition_id, reason=reason)

    @classmethod
    def data_error(cls, partition_id: int, reason: str) -> EvaluateReport:
        """The node's data failed its checks at load (reason: no values)."""
        return cls(Status.DATA_ERROR, partition_id, reason=reason)

    @classmethod
    def node_error(cls, partition_id: int, reason: str) -> EvaluateReport:
        """A device failed to evaluate; ``reason`` names the exception's type only."""
        return cls(Status.NODE_ERROR, partition_id, reason=reason)

    def to_content(self) -> RecordDict:
        """The reply's RecordDict."""
        values: dict[str, Any] = {
            "status": self.status.value,
            "partition-id": self.partition_id,
            "reason": self.reason,
            "num-examples": self.num_examples,
            **{f"eval-{name}": value for name, value in self.scores},
        }
        return RecordDict({REPORT_KEY: _report(EVALUATE_FIELDS, values)})

    @classmethod
    def from_content(cls, content: RecordDict) -> EvaluateReport:
        """Parse an evaluation reply; anything off-contract raises :class:`ReplyError`."""
        raw, status, partition = _read_report(content, EVALUATE_FIELDS, _ALL_EVALUATE)
        scores = tuple(
            (name, _number(raw, f"eval-{name}", float))
            for name in EVAL_METRICS
            if f"eval-{name}" in raw
        )
        return cls(
            status,
            partition,
            str(raw["reason"]) if "reason" in raw else None,
            _number(raw, "num-examples", int),
            scores,
        )
