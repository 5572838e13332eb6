"""The reply contract: everything a client sends back, declared once.

Each field says what protects it:

- ``covered by DP``: the accountant's ε covers it (the DP-SGD update);
- ``public``: a function of what the server or the node's owner set (node config,
  run config, the device's policy), never of the records;
- ``released by policy``: not covered by DP; it leaves only when the node's privacy
  policy says so (in a simulation the run config is the policy, since one person
  holds all the data).

The client builds a report with one constructor per status; the server parses it
with :meth:`TrainReport.from_content` / :meth:`EvaluateReport.from_content`. The
README's "What leaves a client" table is checked against :data:`TRAIN_FIELDS` and
:data:`EVALUATE_FIELDS` by a test.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from common.ledger.chain import REPLY_HEAD_KEY, REPLY_LENGTH_KEY, LedgerFingerprint
from common.ledger.privacy_ledger import LedgerError, PrivacyLedger

ARRAYS_KEY = "arrays"  # ArrayRecord: the model weights of a trained reply
UPDATE_KEY = "update"  # ArrayRecord: a client-level round's clipped model change
MASKED_KEY = "masked-update"  # ArrayRecord: a secure-aggregation upload (one uint8 vector)
# ArrayRecords of a compressed reply (common/wire/update_codec.py), instead of the two above
COMPRESSED_CHANGE_KEY = "compressed-change"  # weights − global model, encoded
COMPRESSED_UPDATE_KEY = "compressed-update"  # a client-level clipped change, encoded
CLIP_NORM_KEY = "clip-norm"  # instruction config: C of a client-level round
REPORT_KEY = "report"  # ConfigRecord: every other field below


# at most one travels with a reply
ARRAY_KEYS = (
    ARRAYS_KEY,
    UPDATE_KEY,
    MASKED_KEY,
    COMPRESSED_CHANGE_KEY,
    COMPRESSED_UPDATE_KEY,
)
COMPRESSED_KEYS = (COMPRESSED_CHANGE_KEY, COMPRESSED_UPDATE_KEY)


def arrays_key(client_level: bool, compressed: bool) -> str:
    """Where a plaintext update travels: weights or a client-level change, as sent
    (float32) or encoded by ``update-compression``."""
    if client_level:
        return COMPRESSED_UPDATE_KEY if compressed else UPDATE_KEY
    return COMPRESSED_CHANGE_KEY if compressed else ARRAYS_KEY


class ReplyError(ValueError):
    """A reply does not follow the contract (missing, extra or mistyped fields)."""


class Status(StrEnum):
    """How a client answered.

    :attr:`ERROR` and :attr:`REJECTED` are the server's labels, never sent by a
    client: a reply that failed (a Flower error, no content), and one the server
    received but refused to use (off the contract, or failing update validation,
    :mod:`server.checks.update_validation`).
    """

    TRAINED = "trained"
    SCORED = "scored"  # federated evaluation ran
    BUDGET_EXHAUSTED = "budget-exhausted"
    POLICY_REFUSED = "policy-refused"
    LEDGER_ERROR = "ledger-error"
    DATA_ERROR = "data-error"  # the node's data failed its checks at load
    NODE_ERROR = "node-error"  # a device failed; only the exception type is sent
    ERROR = "error"
    REJECTED = "rejected"

    @property
    def refused(self) -> bool:
        """The node answered and declined: not a failure, and nothing trained."""
        return self in (Status.BUDGET_EXHAUSTED, Status.POLICY_REFUSED)

    @property
    def counter(self) -> str:
        """The progress-line and ``rounds.jsonl`` counter this status adds to."""
        if self in (Status.TRAINED, Status.SCORED):
            return "trained"
        if self is Status.REJECTED:
            return "rejected"
        return "refused" if self.refused else "failed"


class Coverage(StrEnum):
    """What protects a field that leaves the client."""

    DP = "covered by DP"
    PUBLIC = "public"
    POLICY = "released by policy"


@dataclass(frozen=True)
class ReplyField:
    """One field of a reply: where it travels, what covers it, and when it is sent."""

    key: str
    coverage: Coverage
    statuses: tuple[Status, ...]
    meaning: str
    released_by: str | None = None  # the policy key that lets it leave

    def __post_init__(self) -> None:
        if (self.coverage is Coverage.POLICY) != (self.released_by is not None):
            raise ValueError(f"field {self.key!r}: a policy release names its policy key")


_ALL_TRAIN = (
    Status.TRAINED,
    Status.BUDGET_EXHAUSTED,
    Status.POLICY_REFUSED,
    Status.LEDGER_ERROR,
    Status.DATA_ERROR,
    Status.NODE_ERROR,
)
_ALL_EVALUATE = (Status.SCORED, Status.POLICY_REFUSED, Status.DATA_ERROR, Status.NODE_ERROR)
_REASONED = (
    Status.POLICY_REFUSED, Status.LEDGER_ERROR, Status.DATA_ERROR, Status.NODE_ERROR
)  # fmt: skip

TRAIN_FIELDS: tuple[ReplyField, ...] = (
    ReplyField(
        "arrays",
        Coverage.DP,
        (Status.TRAINED,),
        "model weights after the round's DP-SGD steps (raw weights only in a "
        "non-private run the policy allows: `allow-non-private`)",
    ),
    ReplyField(
        "update",
        Coverage.POLICY,
        (Status.TRAINED,),
        "client-level round (`privacy-mode = 'client'`): the model change, clipped to "
        "L2 norm C and not noised; the server adds the client-level noise to the sum",
        released_by="allow-client-level",
    ),
    ReplyField(
        COMPRESSED_CHANGE_KEY,
        Coverage.DP,
        (Status.TRAINED,),
        "instead of `arrays` when `update-compression` is not 'none': the weights' "
        "change from the global model the server sent, encoded after the DP noise "
        "(float16, or b-bit codes by stochastic rounding from OS entropy): "
        "post-processing, so ε is unchanged; the server adds it to the global model",
    ),
    ReplyField(
        COMPRESSED_UPDATE_KEY,
        Coverage.POLICY,
        (Status.TRAINED,),
        "instead of `update` when `update-compression` is not 'none': the clipped "
        "change, encoded the same way; the server clips the decoded change to C again",
        released_by="allow-client-level",
    ),
    ReplyField(
        MASKED_KEY,
        Coverage.POLICY,
        (Status.TRAINED,),
        "client-level round under secure aggregation: the clipped change, rotated, "
        "quantised, with this node's share of the Skellam noise, masked mod 2^b; the "
        "server can unmask only the sum of at least the round's minimum number of "
        "uploads (see [Secure aggregation](#secure-aggregation-with-distributed-dp))",
        released_by="allow-secure-aggregation",
    ),
    ReplyField(
        "below-clip",
        Coverage.POLICY,
        (Status.TRAINED,),
        "client-level round: whether the change's norm was at most C; the server "
        "noises the count (adaptive clipping, accounted in z)",
        released_by="allow-client-level",
    ),
    ReplyField(
        "status",
        Coverage.PUBLIC,
        _ALL_TRAIN,
        "`trained`, `budget-exhausted`, `policy-refused`, `ledger-error`, `data-error` "
        "or `node-error`",
    ),
    ReplyField(
        "partition-id",
        Coverage.PUBLIC,
        _ALL_TRAIN,
        "the simulated partition from the node config; -1 for a node's own data",
    ),
    ReplyField(
        "reason",
        Coverage.PUBLIC,
        _REASONED,
        "why the node refused, naming the run key, policy key or file; for a "
        "`data-error` the file, the kind of problem and what is allowed; for a "
        "`node-error` only the exception's type (never a value, count or statistic "
        "of the records)",
    ),
    ReplyField(
        "ledger",
        Coverage.POLICY,
        (Status.TRAINED, Status.BUDGET_EXHAUSTED),
        "the whole privacy ledger: accountant, δ, history [(σ, q, steps)], rounds, runs "
        "(q and steps follow from ⌈N/B⌉, so they reveal the shard size to within B)",
        released_by="release-ledger",
    ),
    ReplyField(
        REPLY_HEAD_KEY,
        Coverage.PUBLIC,
        (Status.TRAINED, Status.BUDGET_EXHAUSTED),
        "a node with a state folder: the head of its ledger's SHA-256 hash chain, "
        "salted with a secret that stays on the node (so it says nothing about the "
        "history); the server witnesses it to notice a rolled-back or deleted ledger",
    ),
    ReplyField(
        REPLY_LENGTH_KEY,
        Coverage.PUBLIC,
        (Status.TRAINED, Status.BUDGET_EXHAUSTED),
        "with `ledger-head`: the chain's length, one link per round the node stored "
        "(rounds the servers it trained for saw it train)",
    ),
    ReplyField(
        "planning-records",
        Coverage.POLICY,
        (Status.TRAINED,),
        "the record count a private round was planned from (q, steps, noise divisor) "
        "and the update's aggregation weight: N in a simulation, else the policy's "
        "public count (the update's noise scale reveals it anyway)",
        released_by="planning-records",
    ),
    ReplyField(
        "client-seconds",
        Coverage.POLICY,
        (Status.TRAINED,),
        "the round's compute time on the client (grows with the shard size)",
        released_by="release-timing",
    ),
    ReplyField(
        "num-examples",
        Coverage.POLICY,
        (Status.TRAINED,),
        "training records, sent only by a non-private round (its aggregation weight)",
        released_by="allow-non-private",
    ),
    ReplyField(
        "train-loss",
        Coverage.POLICY,
        (Status.TRAINED,),
        "mean training loss, sent only by a non-private round",
        released_by="allow-non-private",
    ),
)

EVAL_METRICS = ("loss", "accuracy", "precision", "recall", "f1")

EVALUATE_FIELDS: tuple[ReplyField, ...] = (
    ReplyField(
        "status",
        Coverage.PUBLIC,
        _ALL_EVALUATE,
        "`scored`, `policy-refused` (the policy does not allow evaluation), "
        "`data-error` or `node-error`",
    ),
    ReplyField("partition-id", Coverage.PUBLIC, _ALL_EVALUATE, "as in a training reply"),
    ReplyField(
        "reason",
        Coverage.PUBLIC,
        (Status.POLICY_REFUSED, Status.DATA_ERROR, Status.NODE_ERROR),
        "why the node refused, or the exception's type",
    ),
    ReplyField(
        "num-examples",
        Coverage.POLICY,
        (Status.SCORED,),
        "records in the local test split",
        released_by="federated-evaluation",
    ),
    *(
        ReplyField(
            f"eval-{name}",
            Coverage.POLICY,
            (Status.SCORED,),
            f"{name} of the global model on the local test split, without noise",
            released_by="federated-evaluation",
        )
        for name in EVAL_METRICS
    ),
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
    if REPORT_KEY not in content.config_records:
        raise ReplyError(f"reply has no {REPORT_KEY!r} record")
    raw = dict(content.config_records[REPORT_KEY])
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
        _check_keys(TRAIN_FIELDS, self.status, set(self._values()))
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
    def _values(self) -> dict[str, Any]:
        values = {
            "status": self.status.value,
            "partition-id": self.partition_id,
            "reason": self.reason,
            "ledger": self.ledger.to_json() if self.ledger is not None else None,
            "client-seconds": self.client_seconds,
            "num-examples": self.num_examples,
            "train-loss": self.train_loss,
            "planning-records": self.planning_records,
            "below-clip": self.below_clip,
            **(self.fingerprint.to_reply() if self.fingerprint is not None else {}),
        }
        return {k: v for k, v in values.items() if v is not None}

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
        present = set(content.array_records) & set(ARRAY_KEYS)
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
