"""What nodes sign in secure aggregation, and the messages that carry the signatures.

Two signatures per node and round, both Ed25519 under its certified identity
(:mod:`common.secure_aggregation.identity`):

- the **key advertisement** (setup): the run, the round, the node id the server
  gave it, its two fresh public keys and a digest of the round's public plan
  (threshold, quantisation plan, rotation seed). It binds the server-assigned node
  id to a certified identity, and lets every node check that all participants
  were sent the same plan — the same m, so the same share V/m of the noise;
- the **uploader set** (consistency, the ConsistencyCheck round of Bonawitz et al.
  2017, §4): the round, the signer's own advertisement, the list of every
  participant it verified, and the set U of uploads the server will sum. A
  holder reveals shares only for the U it signed itself, and only with at least
  t signatures from its neighbours and at least m in all on that same U.

The byte strings signed are length-prefixed fields under a domain label, so no
field can run into the next and no signature of one kind is valid as the other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flwr.app import ConfigRecord

from common.secure_aggregation.protocol import (
    ProtocolError,
    PublicKeys,
    SetupInstruction,
    Stage,
    bytes_list,
    ints,
    scalar,
    stage_of,
)

ADVERT_LABEL = b"privfed secagg key advertisement v1"
UPLOADERS_LABEL = b"privfed secagg uploader set v1"


def _encode(label: bytes, *fields: bytes | int) -> bytes:
    out = bytearray(label)
    for value in fields:
        raw = value if isinstance(value, bytes) else value.to_bytes(16, "big", signed=True)
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def global_quorum(participants: int) -> int:
    """More than half the participants must sign U before any holder reveals.

    Defence in depth beside the holders' t-neighbours rule: two different sets cannot
    both gather it. The client enforces it; the server uses it to stop a round that
    cannot be unmasked. Each rule is tested without the other.
    """
    return participants // 2 + 1


def plan_digest(setup: SetupInstruction) -> bytes:
    """SHA-256 of the round's public plan as one node got it (its neighbours aside)."""
    record = setup.to_record()
    fields = [k for k in sorted(record) if k != "neighbours"]
    return hashlib.sha256(
        _encode(b"plan", *(f"{k}={record[k]!r}".encode() for k in fields))
    ).digest()


def advert_message(
    run_id: int, server_round: int, node_id: int, keys: PublicKeys, plan: bytes
) -> bytes:
    """What a node signs at setup."""
    return _encode(
        ADVERT_LABEL, run_id, server_round, node_id, keys.encryption, keys.masking, plan
    )


def participants_digest(identities: Mapping[int, bytes]) -> bytes:
    """SHA-256 of every verified participant, as (node id, identity key) in id order."""
    pairs = [x for n in sorted(identities) for x in (n, identities[n])]
    return hashlib.sha256(_encode(b"participants", *pairs)).digest()


def advert_digest(message: bytes) -> bytes:
    """SHA-256 of a signed advertisement message (what an uploader signature binds)."""
    return hashlib.sha256(message).digest()


def uploaders_message(
    run_id: int,
    server_round: int,
    signer_advert: bytes,
    participants: bytes,
    uploaded: Iterable[int],
    identities: Mapping[int, bytes],
) -> bytes:
    """What a node signs at the consistency stage: the uploader set U by node id and
    certified identity, bound to the round, its signer's advertisement digest (fresh
    keys: no replay from another round) and the participants it verified."""
    pairs = [x for n in sorted(uploaded) for x in (n, identities[n])]
    return _encode(
        UPLOADERS_LABEL, run_id, server_round, signer_advert, participants, *pairs
    )


@dataclass(frozen=True)
class Advertisement:
    """A node's signed key advertisement: its keys, identity certificate, signature."""

    node: int
    keys: PublicKeys
    certificate: bytes
    signature: bytes

    def to_reply(self) -> ConfigRecord:
        """Stage 1 reply, client → server (the server knows whose reply it is)."""
        return ConfigRecord(
            {
                **self.keys.to_record(),
                "identity-certificate": self.certificate,
                "advert-signature": self.signature,
            }
        )

    @classmethod
    def from_reply(cls, node: int, record: ConfigRecord) -> Advertisement:
        """Parse a setup reply of ``node``; off-schema raises :class:`ProtocolError`."""
        return cls(
            node,
            PublicKeys.from_record(record),
            scalar(record, "identity-certificate", bytes),
            scalar(record, "advert-signature", bytes),
        )


@dataclass(frozen=True)
class KeysInstruction:
    """Stage 2, server → client: every participant's signed advertisement (a client
    in a sparse graph sees beyond its neighbours, to count who takes part)."""

    server_round: int
    adverts: Mapping[int, Advertisement]

    def to_record(self) -> ConfigRecord:
        """The wire form."""
        fields: dict = {"stage": Stage.SHARE_KEYS.value, "server-round": self.server_round}
        adverts_to_record(self.adverts, fields)
        return ConfigRecord(fields)

    @classmethod
    def from_record(cls, record: ConfigRecord) -> KeysInstruction:
        """Parse; anything off-schema raises :class:`ProtocolError`."""
        return cls(stage_of(record, Stage.SHARE_KEYS), adverts_from_record(record))


def adverts_to_record(adverts: Mapping[int, Advertisement], into: dict) -> None:
    """Add the adverts of every participant to a share-keys instruction's fields."""
    nodes = sorted(adverts)
    into["nodes"] = nodes
    into["pk-encryption"] = [adverts[n].keys.encryption for n in nodes]
    into["pk-masking"] = [adverts[n].keys.masking for n in nodes]
    into["certificates"] = [adverts[n].certificate for n in nodes]
    into["signatures"] = [adverts[n].signature for n in nodes]


def adverts_from_record(record: ConfigRecord) -> dict[int, Advertisement]:
    """The adverts a share-keys instruction carries (one per distinct node)."""
    nodes = ints(record, "nodes")
    columns = [
        bytes_list(record, k)
        for k in ("pk-encryption", "pk-masking", "certificates", "signatures")
    ]
    if any(len(c) != len(nodes) for c in columns) or len(set(nodes)) != len(nodes):
        raise ProtocolError("key advertisements: one of each field per distinct node")
    return {
        n: Advertisement(n, PublicKeys(e, m), c, s)
        for n, e, m, c, s in zip(nodes, *columns, strict=True)
    }


@dataclass(frozen=True)
class ConsistencyInstruction:
    """Stage 4, server → each uploader: the set U of uploads the sum will hold."""

    server_round: int
    uploaded: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(set(self.uploaded)) != len(self.uploaded):
            raise ProtocolError("a node is listed twice")

    def to_record(self) -> ConfigRecord:
        """The wire form."""
        return ConfigRecord(
            {
                "stage": Stage.CONSISTENCY.value,
                "server-round": self.server_round,
                "uploaded": sorted(self.uploaded),
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> ConsistencyInstruction:
        """Parse; anything off-schema raises :class:`ProtocolError`."""
        return cls(stage_of(record, Stage.CONSISTENCY), tuple(ints(record, "uploaded")))


def signature_record(signature: bytes) -> ConfigRecord:
    """Stage 4 reply: the node's signature of U."""
    return ConfigRecord({"uploader-signature": signature})


def signature_from_record(record: ConfigRecord) -> bytes:
    """The signature a consistency reply carries."""
    return scalar(record, "uploader-signature", bytes)


@dataclass(frozen=True)
class UnmaskInstruction:
    """Stage 5, server → signers: U and the signatures on it, by signer.

    Each holder works out from U what to reveal: the mask seeds of its neighbours in
    U, the mask keys of the neighbours that shared keys with it but are not in U.
    """

    server_round: int
    uploaded: tuple[int, ...]
    signatures: Mapping[int, bytes]

    def __post_init__(self) -> None:
        if len(set(self.uploaded)) != len(self.uploaded):
            raise ProtocolError("a node is listed twice")
        if not set(self.signatures) <= set(self.uploaded):
            raise ProtocolError("a signature from a node outside the uploader set")

    def to_record(self) -> ConfigRecord:
        """The wire form."""
        signers = sorted(self.signatures)
        return ConfigRecord(
            {
                "stage": Stage.UNMASK.value,
                "server-round": self.server_round,
                "uploaded": sorted(self.uploaded),
                "signers": signers,
                "signatures": [self.signatures[n] for n in signers],
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> UnmaskInstruction:
        """Parse; anything off-schema raises :class:`ProtocolError`."""
        server_round = stage_of(record, Stage.UNMASK)
        signers, signatures = ints(record, "signers"), bytes_list(record, "signatures")
        if len(signers) != len(signatures) or len(set(signers)) != len(signers):
            raise ProtocolError("uploader signatures: one per distinct signer")
        return cls(
            server_round,
            tuple(ints(record, "uploaded")),
            dict(zip(signers, signatures, strict=True)),
        )
