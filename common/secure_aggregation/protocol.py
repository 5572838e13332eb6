"""Secure aggregation with distributed DP: the stages and the messages both sides exchange.

The stages follow SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020) as Flower's
legacy ``SecAggPlusWorkflow`` / ``secaggplus_mod`` run them, with the
ConsistencyCheck round of Bonawitz et al.'s malicious-server variant, carried here
as Message-API ``train.<stage>`` messages:

1. **setup** — the server sends each sampled client the round's public plan
   (:class:`~common.secure_aggregation.distributed_dp.QuantisationPlan`), the reconstruction
   threshold t and the client's neighbours; the client answers with two fresh
   public keys, signed with its certified identity;
2. **share keys** — the server forwards every participant's signed advertisement;
   the client checks them all (certificates, signatures, one plan, m at most the
   participants it verified), draws its private mask seed, Shamir-shares it and its
   mask key among its neighbours (threshold t) and returns each share encrypted
   for its holder;
3. **masked update** — the server forwards the encrypted shares and the global
   model; the client trains, clips, adds its Skellam share, quantises and masks
   (its private mask and ± one pairwise mask per neighbour that shared keys);
4. **consistency** — the server sends each uploader the set U of uploads it will
   sum; the client signs U;
5. **unmask** — the server sends U with the signatures; the client checks them and
   returns its shares of the mask seeds of its neighbours in U and of the mask keys
   of those that shared keys but are not in U, never both for one node.

This module declares the stages, the record keys and the unsigned messages' schemas;
the signed ones are :mod:`common.secure_aggregation.consistency`'s. The client's
state machine is :mod:`client.secure_aggregation.stages`, the server's
:mod:`server.secure_aggregation.round`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from flwr.app import ConfigRecord

from common.secure_aggregation.distributed_dp import QuantisationPlan
from common.wire.reply_fields import Coverage, ReplyField, Status

SECAGG_KEY = "secagg"  # ConfigRecord of every stage, both directions
PACKED_ARRAY = "packed"  # the one array of the upload (common.wire.reply.MASKED_KEY)
SEED_BYTES = 32
EPSILON_KEY = "epsilon-against-server"  # a client's own ε, in its unmask reply


class Stage(StrEnum):
    """The five stages, in order; each is a ``train.<stage>`` message."""

    SETUP = "secagg_setup"
    SHARE_KEYS = "secagg_share_keys"
    MASKED_UPDATE = "secagg_masked_update"
    CONSISTENCY = "secagg_consistency"
    UNMASK = "secagg_unmask"

    @property
    def message_type(self) -> str:
        """Flower's message type (category ``train``, action the stage)."""
        return f"train.{self.value}"


def _released(key: str, meaning: str) -> ReplyField:
    return ReplyField(
        key, Coverage.POLICY, (Status.TRAINED,), meaning,
        released_by="allow-secure-aggregation",
    )  # fmt: skip


# What each stage's reply carries in its ``secagg`` record (the masked update's report
# and upload are common.wire.reply_fields.TRAIN_FIELDS'); the docs' table is checked
# against it.
STAGE_FIELDS: dict[Stage, tuple[ReplyField, ...]] = {
    Stage.SETUP: (
        _released("pk-encryption", "a fresh public key (X25519) the neighbours "
                  "encrypt this node's shares with; new each round"),
        _released("pk-masking", "a fresh public key the neighbours agree pairwise "
                  "masks with; new each round"),
        _released("identity-certificate", "the CA's certificate of this node's Ed25519 "
                  "identity key (the same every round: it links the node's rounds)"),
        _released("advert-signature", "its signature of the two keys, the node id, "
                  "the round and the round's plan"),
    ),
    Stage.SHARE_KEYS: (
        _released("nodes", "the neighbours the ciphertexts are for"),
        _released("ciphertexts", "this node's Shamir shares of its mask seed and mask "
                  "key, each encrypted for its holder (the server cannot read them)"),
    ),
    Stage.CONSISTENCY: (
        _released("uploader-signature", "its signature of the set of uploads the "
                  "server says it will sum"),
    ),
    Stage.UNMASK: (
        _released("seed-nodes", "the neighbours that uploaded, whose shares follow"),
        _released("seed-shares", "the shares this node holds of those neighbours' mask "
                  "seeds (they remove private masks from the sum)"),
        _released("key-nodes", "the neighbours that dropped after sharing keys"),
        _released("key-shares", "the shares this node holds of those neighbours' mask "
                  "keys (they remove the pairwise masks others added for them)"),
        _released(EPSILON_KEY, "this node's own ε against the server so "
                  "far: the unsampled releases of the uploads it verified (public "
                  "numbers only)"),
    ),
}  # fmt: skip


class ProtocolError(ValueError):
    """A stage message does not follow the protocol; the receiver refuses it."""


def threshold_for(num_shares: int, fraction: float) -> int:
    """t = ⌈fraction·k⌉ shares reconstruct a secret; always more than half of k.

    More than half: each holder reveals at most one of a node's two secrets, so a
    server that calls a node "dropped" to some holders and "uploaded" to others
    can never gather t shares of both.
    """
    t = max(2, math.ceil(fraction * num_shares - 1e-9))
    check_threshold(t, num_shares)
    return t


def check_threshold(threshold: int, num_shares: int) -> None:
    """Raise :class:`ProtocolError` unless 2 ≤ t ≤ k and t is more than half of k."""
    if not (threshold >= 2 and num_shares / 2 < threshold <= num_shares):
        raise ProtocolError(
            f"a threshold of {threshold} of {num_shares} shares must be at least 2, at "
            "most the number of shares, and more than half of them"
        )


def ints(record: ConfigRecord, key: str) -> list[int]:
    value = record.get(key)
    if not isinstance(value, list) or any(
        isinstance(v, bool) or not isinstance(v, int) for v in value
    ):
        raise ProtocolError(f"secure-aggregation field {key!r} must be a list of ints")
    return list(value)


def bytes_list(record: ConfigRecord, key: str) -> list[bytes]:
    value = record.get(key)
    if not isinstance(value, list) or any(not isinstance(v, bytes) for v in value):
        raise ProtocolError(f"secure-aggregation field {key!r} must be a list of bytes")
    return list(value)


def scalar(record: ConfigRecord, key: str, kind: type) -> Any:
    value = record.get(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ProtocolError(f"secure-aggregation field {key!r} must be {kind.__name__}")
    return value


def stage_of(record: ConfigRecord, expected: Stage) -> int:
    """Check the record's stage; return its server round."""
    if record.get("stage") != expected.value:
        raise ProtocolError(
            f"expected a {expected.value!r} record, got {record.get('stage')!r}"
        )
    return scalar(record, "server-round", int)


@dataclass(frozen=True)
class SetupInstruction:
    """Stage 1, server → client: the round's plan, threshold and neighbours."""

    server_round: int
    neighbours: tuple[int, ...]  # node ids sharing secrets with the receiver, itself too
    threshold: int
    plan: QuantisationPlan
    rotation_seed: bytes

    def __post_init__(self) -> None:
        if len(set(self.neighbours)) != len(self.neighbours):
            raise ProtocolError("a neighbour is listed twice")
        check_threshold(self.threshold, len(self.neighbours))
        if len(self.rotation_seed) != SEED_BYTES:
            raise ProtocolError(f"the rotation seed has {SEED_BYTES} bytes")

    def to_record(self) -> ConfigRecord:
        """The wire form."""
        p = self.plan
        return ConfigRecord(
            {
                "stage": Stage.SETUP.value,
                "server-round": self.server_round,
                "neighbours": list(self.neighbours),
                "threshold": self.threshold,
                "dim": p.dim,
                "clip-norm": p.clip_norm,
                "coordinate-clip": p.coordinate_clip,
                "scale": p.scale,
                "modulus-bits": p.modulus_bits,
                "noise-multiplier": p.noise_multiplier,
                "min-contributors": p.min_contributors,
                "rotation-seed": self.rotation_seed,
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> SetupInstruction:
        """Parse and check; anything off-schema raises :class:`ProtocolError`."""
        server_round = stage_of(record, Stage.SETUP)
        try:
            plan = QuantisationPlan(
                dim=scalar(record, "dim", int),
                clip_norm=scalar(record, "clip-norm", float),
                coordinate_clip=scalar(record, "coordinate-clip", float),
                scale=scalar(record, "scale", float),
                modulus_bits=scalar(record, "modulus-bits", int),
                noise_multiplier=scalar(record, "noise-multiplier", float),
                min_contributors=scalar(record, "min-contributors", int),
            )
        except ValueError as exc:
            raise ProtocolError(f"the round's plan is invalid: {exc}") from None
        return cls(
            server_round,
            tuple(ints(record, "neighbours")),
            scalar(record, "threshold", int),
            plan,
            scalar(record, "rotation-seed", bytes),
        )


@dataclass(frozen=True)
class PublicKeys:
    """Stage 1, client → server: a key for share encryption and one for masks."""

    encryption: bytes
    masking: bytes

    def to_record(self) -> ConfigRecord:
        """The wire form."""
        return ConfigRecord({"pk-encryption": self.encryption, "pk-masking": self.masking})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> PublicKeys:
        """Parse; anything off-schema raises :class:`ProtocolError`."""
        return cls(
            scalar(record, "pk-encryption", bytes), scalar(record, "pk-masking", bytes)
        )


@dataclass(frozen=True)
class EncryptedShares:
    """Stage 2 reply (client → server) and stage 3 forward (server → client).

    ``nodes[i]`` is the holder (in a reply) or the sender (in a forward) of
    ``ciphertexts[i]``.
    """

    server_round: int
    nodes: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if len(self.nodes) != len(self.ciphertexts) or len(set(self.nodes)) != len(
            self.nodes
        ):
            raise ProtocolError("encrypted shares: one ciphertext per distinct node")

    def to_record(self, stage: Stage) -> ConfigRecord:
        """The wire form for ``stage`` (share keys reply, or masked update forward)."""
        return ConfigRecord(
            {
                "stage": stage.value,
                "server-round": self.server_round,
                "nodes": list(self.nodes),
                "ciphertexts": list(self.ciphertexts),
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord, stage: Stage) -> EncryptedShares:
        """Parse; anything off-schema raises :class:`ProtocolError`."""
        server_round = stage_of(record, stage)
        return cls(
            server_round,
            tuple(ints(record, "nodes")),
            tuple(bytes_list(record, "ciphertexts")),
        )


@dataclass(frozen=True)
class RevealedShares:
    """Stage 4, client → server: shares of uploaders' mask seeds and of dropped
    clients' mask keys, by owner."""

    seed_shares: dict[int, bytes]
    key_shares: dict[int, bytes]

    def __post_init__(self) -> None:
        if set(self.seed_shares) & set(self.key_shares):
            raise ProtocolError("both secrets of one node revealed")

    def to_record(self) -> ConfigRecord:
        """The wire form."""
        seeds, keys = sorted(self.seed_shares), sorted(self.key_shares)
        return ConfigRecord(
            {
                "seed-nodes": seeds,
                "seed-shares": [self.seed_shares[n] for n in seeds],
                "key-nodes": keys,
                "key-shares": [self.key_shares[n] for n in keys],
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RevealedShares:
        """Parse; anything off-schema raises :class:`ProtocolError`."""
        seeds, seed_shares = ints(record, "seed-nodes"), bytes_list(record, "seed-shares")
        keys, key_shares = ints(record, "key-nodes"), bytes_list(record, "key-shares")
        if len(seeds) != len(seed_shares) or len(keys) != len(key_shares):
            raise ProtocolError("revealed shares: one share per listed node")
        return cls(
            dict(zip(seeds, seed_shares, strict=True)),
            dict(zip(keys, key_shares, strict=True)),
        )
