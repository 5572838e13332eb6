"""What one client holds between the stages of a secure-aggregation round.

The round's secrets live in ``context.state`` (the SuperNode's memory, or the
simulation's node state), never on disk, and are wiped after the unmask stage or
when the round is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Context

from common.secure_aggregation.protocol import (
    ProtocolError,
    PublicKeys,
    SetupInstruction,
    Stage,
)

STATE_KEY = "secagg-state"  # context.state ConfigRecord of the round in progress
# the last (run, round) this node set up; kept when the secrets are wiped
LAST_SETUP_KEY = "secagg-last-setup"


@dataclass
class RoundSecrets:
    """What one client holds between the stages of one round."""

    node_id: int
    run_id: int
    setup: SetupInstruction
    stage: Stage
    encryption_key: bytes  # X25519 private key, never shared
    masking_key: bytes  # X25519 private key, Shamir-shared among the neighbours
    public: PublicKeys
    peers: dict[int, PublicKeys] = field(default_factory=dict)  # neighbours with keys
    mask_seed: bytes = b""
    seed_shares: dict[int, bytes] = field(default_factory=dict)  # owner -> share I hold
    key_shares: dict[int, bytes] = field(default_factory=dict)
    partners: tuple[int, ...] = ()  # neighbours whose shares arrived: pairwise masks
    # every participant whose signed advertisement this node verified
    identities: dict[int, bytes] = field(default_factory=dict)  # node -> identity key
    advert_digests: dict[int, bytes] = field(default_factory=dict)
    signed: tuple[int, ...] = ()  # the uploader set this node signed

    def to_record(self) -> ConfigRecord:
        """Everything as one ConfigRecord (lists, since records hold no dicts)."""
        values: dict[str, Any] = {
            **{f"setup.{k}": v for k, v in self.setup.to_record().items()},
            "node-id": self.node_id,
            "run-id": self.run_id,
            "stage": self.stage.value,
            "encryption-key": self.encryption_key,
            "masking-key": self.masking_key,
            "pk-encryption": self.public.encryption,
            "pk-masking": self.public.masking,
            "mask-seed": self.mask_seed,
            "partners": list(self.partners),
            "signed": list(self.signed),
        }
        peers = sorted(self.peers)
        values["peer-nodes"] = peers
        values["peer-pk-encryption"] = [self.peers[n].encryption for n in peers]
        values["peer-pk-masking"] = [self.peers[n].masking for n in peers]
        for name, table in (
            ("seed-share", self.seed_shares),
            ("key-share", self.key_shares),
            ("identity", self.identities),
            ("advert-digest", self.advert_digests),
        ):
            nodes = sorted(table)
            values[f"{name}-nodes"] = nodes
            values[f"{name}s"] = [table[n] for n in nodes]
        return ConfigRecord(values)

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundSecrets:
        """The inverse of :meth:`to_record`."""
        raw = dict(record)
        setup = SetupInstruction.from_record(
            ConfigRecord({k[6:]: v for k, v in raw.items() if k.startswith("setup.")})
        )
        peers = {
            n: PublicKeys(e, m)
            for n, e, m in zip(
                raw["peer-nodes"], raw["peer-pk-encryption"], raw["peer-pk-masking"],
                strict=True,
            )
        }  # fmt: skip

        def table(name: str) -> dict[int, bytes]:
            return dict(zip(raw[f"{name}-nodes"], raw[f"{name}s"], strict=True))

        return cls(
            node_id=int(raw["node-id"]),
            run_id=int(raw["run-id"]),
            setup=setup,
            stage=Stage(raw["stage"]),
            encryption_key=raw["encryption-key"],
            masking_key=raw["masking-key"],
            public=PublicKeys(raw["pk-encryption"], raw["pk-masking"]),
            peers=peers,
            mask_seed=raw["mask-seed"],
            seed_shares=table("seed-share"),
            key_shares=table("key-share"),
            partners=tuple(raw["partners"]),
            identities=table("identity"),
            advert_digests=table("advert-digest"),
            signed=tuple(raw["signed"]),
        )


def save(context: Context, secrets_: RoundSecrets) -> None:
    """Keep the round's state for the next stage."""
    context.state.config_records[STATE_KEY] = secrets_.to_record()


def load_secrets(context: Context, expected: Stage, server_round: int) -> RoundSecrets:
    """The round's secrets, if the last stage this node completed is ``expected``."""
    record = context.state.config_records.get(STATE_KEY)
    if record is None:
        raise ProtocolError("no secure-aggregation round in progress on this node")
    held = RoundSecrets.from_record(record)
    if held.setup.server_round != server_round or held.stage is not expected:
        raise ProtocolError(
            f"out of order: this node completed {held.stage.value!r} of round "
            f"{held.setup.server_round}, not {expected.value!r} of round {server_round}"
        )
    return held


def forget(context: Context) -> None:
    """Wipe the round's secrets (after unmasking, or when the round is abandoned)."""
    context.state.config_records.pop(STATE_KEY, None)


def claim_round(context: Context, run_id: int, server_round: int) -> None:
    """Record that this node sets up ``server_round`` of ``run_id``, once.

    A node advertises keys and signs an uploader set at most once per round: a
    second setup of the same (or an earlier) round would give the server a second
    incarnation of the node, with fresh keys and a fresh signature, to place in a
    second view of the round. Kept in ``context.state`` beside the secrets, so it
    outlives :func:`forget`.
    """
    record = context.state.config_records.get(LAST_SETUP_KEY)
    if record is not None and int(record["run-id"]) == run_id:
        last = int(record["server-round"])
        if server_round <= last:
            raise ProtocolError(
                f"this node already set up round {last} of this run; it sets up each "
                f"round once and never an earlier one (asked for round {server_round})"
            )
    context.state.config_records[LAST_SETUP_KEY] = ConfigRecord(
        {"run-id": run_id, "server-round": server_round}
    )
