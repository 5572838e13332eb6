"""The reply contract: everything a client sends back, declared once.

Each field says what protects it:

- ``covered by DP``: the accountant's ε covers it (the DP-SGD update);
- ``public``: a function of what the server or the node's owner set (node config,
  run config, the device's policy), never of the records;
- ``released by policy``: not covered by DP; it leaves only when the node's privacy
  policy says so (in a simulation the run config is the policy, since one person
  holds all the data).

The client builds a report with one constructor per status; the server parses it
with :class:`common.wire.reply.TrainReport` / :class:`common.wire.reply.EvaluateReport`.
The "What leaves a client" table of docs/privacy-model.md is checked against
:data:`TRAIN_FIELDS` and :data:`EVALUATE_FIELDS` by a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from common.ledger.chain import REPLY_HEAD_KEY, REPLY_LENGTH_KEY

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
        "(q and steps follow from ⌈n/B⌉ for the planning count n: a device's public "
        "planning-records, a simulated partition's size)",
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
