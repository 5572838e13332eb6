"""Secure aggregation with distributed DP: the messages both sides exchange.

The stages follow SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020) as Flower's
legacy ``SecAggPlusWorkflow`` / ``secaggplus_mod`` run them, carried here as
Message-API ``train.<stage>`` messages:

1. **setup** — the server sends each sampled client the round's public plan
   (:class:`~common.secure_aggregation.distributed_dp.QuantisationPlan`), the reconstruction
   threshold t and the client's neighbours; the client answers with two fresh
   public keys (one to encrypt shares, one to agree pairwise masks);
2. **share keys** — the server forwards the neighbours' public keys; the client
   draws its private mask seed, Shamir-shares it and its mask key among its
   neighbours (threshold t) and returns each share encrypted for its holder;
3. **masked update** — the server forwards the encrypted shares and the global
   model; the client trains, clips, adds its Skellam share, quantises and masks
   (its private mask and ± one pairwise mask per neighbour that shared keys);
4. **unmask** — the server says which neighbours uploaded and which dropped
   after sharing; the client returns its shares of the uploaders' mask seeds and
   of the dropped clients' mask keys, never both for one node.

This module declares the stages, the record keys and the instruction schemas
once; the client's state machine is :mod:`client.secure_aggregation.stages`, the server's
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


class Stage(StrEnum):
    """The four stages, in order; each is a ``train.<stage>`` message."""

    SETUP = "secagg_setup"
    SHARE_KEYS = "secagg_share_keys"
    MASKED_UPDATE = "secagg_masked_update"
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
    ),
    Stage.SHARE_KEYS: (
        _released("nodes", "the neighbours the ciphertexts are for"),
        _released("ciphertexts", "this node's Shamir shares of its mask seed and mask "
                  "key, each encrypted for its holder (the server cannot read them)"),
    ),
    Stage.UNMASK: (
        _released("seed-nodes", "the neighbours that uploaded, whose shares follow"),
        _released("seed-shares", "the shares this node holds of those neighbours' mask "
                  "seeds (they remove private masks from the sum)"),
        _released("key-nodes", "the neighbours that dropped after sharing keys"),
        _released("key-shares", "the shares this node holds of those neighbours' mask "
                  "keys (they remove the pairwise masks others added for them)"),
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


def _ints(record: ConfigRecord, key: str) -> list[int]:
    value = record.get(key)
    if not isinstance(value, list) or any(
        isinstance(v, bool) or not isinstance(v, int) for v in value
    ):
        raise ProtocolError(f"secure-aggregation field {key!r} must be a list of ints")
    return list(value)


def _bytes_list(record: ConfigRecord, key: str) -> list[bytes]:
    value = record.get(key)
    if not isinstance(value, list) or any(not isinstance(v, bytes) for v in value):
        raise ProtocolError(f"secure-aggregation field {key!r} must be a list of bytes")
    return list(value)


def _scalar(record: ConfigRecord, key: str, kind: type) -> Any:
    value = record.get(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ProtocolError(f"secure-aggregation field {key!r} must be {kind.__name__}")
    return value


def _stage_of(record: ConfigRecord, expected: Stage) -> int:
    """Check the record's stage; return its server round."""
    if record.get("stage") != expected.value:
        raise ProtocolError(
            f"expected a {expected.value!r} record, got {record.get('stage')!r}"
        )
    return _scalar(record, "server-round", int)


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
        server_round = _stage_of(record, Stage.SETUP)
        try:
            plan = QuantisationPlan(
                dim=_scalar(record, "dim", int),
                clip_norm=_scalar(record, "clip-norm", float),
                coordinate_clip=_scalar(record, "coordinate-clip", float),
                scale=_scalar(record, "scale", float),
                modulus_bits=_scalar(record, "modulus-bits", int),
                noise_multiplier=_scalar(record, "noise-multiplier", float),
                min_contributors=_scalar(record, "min-contributors", int),
            )
        except ValueError as exc:
            raise ProtocolError(f"the round's plan is invalid: {exc}") from None
        return cls(
            server_round,
            tuple(_ints(record, "neighbours")),
            _scalar(record, "threshold", int),
            plan,
            _scalar(record, "rotation-seed", bytes),
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
            _scalar(record, "pk-encryption", bytes), _scalar(record, "pk-masking", bytes)
        )


@dataclass(frozen=True)
class KeysInstruction:
    """Stage 2, server → client: the public keys of the neighbours that advertised."""

    server_round: int
    keys: dict[int, PublicKeys]

    def to_record(self) -> ConfigRecord:
        """The wire form."""
        nodes = sorted(self.keys)
        return ConfigRecord(
            {
                "stage": Stage.SHARE_KEYS.value,
                "server-round": self.server_round,
                "nodes": nodes,
                "pk-encryption": [self.keys[n].encryption for n in nodes],
                "pk-masking": [self.keys[n].masking for n in nodes],
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> KeysInstruction:
        """Parse; anything off-schema raises :class:`ProtocolError`."""
        server_round = _stage_of(record, Stage.SHARE_KEYS)
        nodes = _ints(record, "nodes")
        enc = _bytes_list(record, "pk-encryption")
        masking = _bytes_list(record, "pk-masking")
        if not len(nodes) == len(enc) == len(masking) or len(set(nodes)) != len(nodes):
            raise ProtocolError("public keys: one pair per distinct node")
        keys = {n: PublicKeys(e, m) for n, e, m in zip(nodes, enc, masking, strict=True)}
        return cls(server_round, keys)


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
        server_round = _stage_of(record, stage)
        return cls(
            server_round,
            tuple(_ints(record, "nodes")),
            tuple(_bytes_list(record, "ciphertexts")),
        )


@dataclass(frozen=True)
class UnmaskInstruction:
    """Stage 4, server → client: which neighbours uploaded, which dropped after sharing,
    and how many uploads the sum holds in all."""

    server_round: int
    uploaded: tuple[int, ...]
    dropped: tuple[int, ...]
    contributors: int

    def __post_init__(self) -> None:
        if set(self.uploaded) & set(self.dropped):
            raise ProtocolError(
                "a node is listed both as uploaded and as dropped: answering would "
                "reveal both its mask seed and its mask key"
            )
        if len(set(self.uploaded)) != len(self.uploaded) or len(set(self.dropped)) != len(
            self.dropped
        ):
            raise ProtocolError("a node is listed twice")
        if self.contributors < len(self.uploaded):
            raise ProtocolError("fewer contributors than listed uploads")

    def to_record(self) -> ConfigRecord:
        """The wire form."""
        return ConfigRecord(
            {
                "stage": Stage.UNMASK.value,
                "server-round": self.server_round,
                "uploaded": list(self.uploaded),
                "dropped": list(self.dropped),
                "contributors": self.contributors,
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> UnmaskInstruction:
        """Parse; anything off-schema raises :class:`ProtocolError`."""
        server_round = _stage_of(record, Stage.UNMASK)
        return cls(
            server_round,
            tuple(_ints(record, "uploaded")),
            tuple(_ints(record, "dropped")),
            _scalar(record, "contributors", int),
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
        seeds, seed_shares = _ints(record, "seed-nodes"), _bytes_list(record, "seed-shares")
        keys, key_shares = _ints(record, "key-nodes"), _bytes_list(record, "key-shares")
        if len(seeds) != len(seed_shares) or len(keys) != len(key_shares):
            raise ProtocolError("revealed shares: one share per listed node")
        return cls(
            dict(zip(seeds, seed_shares, strict=True)),
            dict(zip(keys, key_shares, strict=True)),
        )
