"""A client's side of secure aggregation with distributed DP, one stage per message.

The stages are declared in :mod:`common.secure_aggregation.protocol`. Between stages the
round's secrets live in ``context.state`` (the SuperNode's memory, or the
simulation's node state), never on disk, and are wiped after the unmask stage.
Keys, seeds and shares come from :mod:`common.secure_aggregation.keys` (X25519 and HKDF from
``cryptography``, Flower's Fernet encryption, pycryptodome's Shamir sharing) and
``os.urandom``; masks from AES-CTR (:mod:`common.secure_aggregation.masks`); the
Skellam noise and the rounding from OS entropy.

The client refuses (``ProtocolError``) anything a curious server could use to
unmask it alone: a stage out of order or from another round, its own keys
misquoted, too few neighbours to reach the threshold, a threshold of half the
shares or fewer, an unmask request that lists a node as both uploaded and
dropped, names itself dropped, counts fewer contributors than the round's
minimum, or comes twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from common.privacy.randomness import integer_generator
from common.secure_aggregation.distributed_dp import rotation_signs
from common.secure_aggregation.keys import (
    ENCRYPTION,
    MASKING,
    agree,
    fernet_key,
    new_secret,
    public_key,
    split,
)
from common.secure_aggregation.masks import mask, mask_nonce, pack
from common.secure_aggregation.protocol import (
    PACKED_ARRAY,
    SECAGG_KEY,
    EncryptedShares,
    KeysInstruction,
    ProtocolError,
    PublicKeys,
    RevealedShares,
    SetupInstruction,
    Stage,
    UnmaskInstruction,
)

STATE_KEY = "secagg-state"  # context.state ConfigRecord of the round in progress


@dataclass
class RoundSecrets:
    """What one client holds between the stages of one round."""

    node_id: int
    setup: SetupInstruction
    stage: Stage
    encryption_key: bytes  # X25519 private key, never shared
    masking_key: bytes  # X25519 private key, Shamir-shared among the neighbours
    public: PublicKeys
    peers: dict[int, PublicKeys] = field(default_factory=dict)
    mask_seed: bytes = b""
    seed_shares: dict[int, bytes] = field(default_factory=dict)  # owner -> share I hold
    key_shares: dict[int, bytes] = field(default_factory=dict)
    partners: tuple[int, ...] = ()  # neighbours whose shares arrived: pairwise masks

    # -- persistence in context.state -------------------------------------------------
    def to_record(self) -> ConfigRecord:
        """Everything as one ConfigRecord (lists, since records hold no dicts)."""
        seeds, keys, peers = (
            sorted(self.seed_shares),
            sorted(self.key_shares),
            sorted(self.peers),
        )
        values: dict[str, Any] = {
            **{f"setup.{k}": v for k, v in self.setup.to_record().items()},
            "node-id": self.node_id,
            "stage": self.stage.value,
            "encryption-key": self.encryption_key,
            "masking-key": self.masking_key,
            "pk-encryption": self.public.encryption,
            "pk-masking": self.public.masking,
            "peer-nodes": peers,
            "peer-pk-encryption": [self.peers[n].encryption for n in peers],
            "peer-pk-masking": [self.peers[n].masking for n in peers],
            "mask-seed": self.mask_seed,
            "seed-share-nodes": seeds,
            "seed-shares": [self.seed_shares[n] for n in seeds],
            "key-share-nodes": keys,
            "key-shares": [self.key_shares[n] for n in keys],
            "partners": list(self.partners),
        }
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
        return cls(
            node_id=int(raw["node-id"]),
            setup=setup,
            stage=Stage(raw["stage"]),
            encryption_key=raw["encryption-key"],
            masking_key=raw["masking-key"],
            public=PublicKeys(raw["pk-encryption"], raw["pk-masking"]),
            peers=peers,
            mask_seed=raw["mask-seed"],
            seed_shares=dict(zip(raw["seed-share-nodes"], raw["seed-shares"], strict=True)),
            key_shares=dict(zip(raw["key-share-nodes"], raw["key-shares"], strict=True)),
            partners=tuple(raw["partners"]),
        )


def _save(context: Context, secrets_: RoundSecrets) -> None:
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


# -- stage 1 ---------------------------------------------------------------------------
def setup(context: Context, node_id: int, record: ConfigRecord, dim: int,
          least_noise: float) -> ConfigRecord:  # fmt: skip
    """Check the round's plan and answer with two fresh public keys.

    ``dim`` is the model's parameter count and ``least_noise`` the least noise
    multiplier the node's policy accepts; a plan that disagrees is refused.
    """
    instruction = SetupInstruction.from_record(record)
    plan = instruction.plan
    if node_id not in instruction.neighbours:
        raise ProtocolError("the node is not among the neighbours it was sent")
    if plan.dim != dim:
        raise ProtocolError(f"the plan is for {plan.dim} parameters, the model has {dim}")
    if plan.noise_multiplier < least_noise:
        raise ProtocolError(
            f"the plan's noise multiplier {plan.noise_multiplier:.4g} is below this "
            f"node's least ({least_noise:.4g}, policy key 'min-noise-multiplier')"
        )
    forget(context)  # a new round abandons any earlier one
    encryption, masking = new_secret(), new_secret()
    public = PublicKeys(public_key(encryption), public_key(masking))
    held = RoundSecrets(
        node_id=node_id,
        setup=instruction,
        stage=Stage.SETUP,
        encryption_key=encryption,
        masking_key=masking,
        public=public,
    )
    _save(context, held)
    return public.to_record()


# -- stage 2 ---------------------------------------------------------------------------
def share_keys(context: Context, record: ConfigRecord) -> ConfigRecord:
    """Share the mask seed and the mask key among the neighbours, encrypted."""
    instruction = KeysInstruction.from_record(record)
    held = load_secrets(context, Stage.SETUP, instruction.server_round)
    keys = instruction.keys
    t = held.setup.threshold
    if not set(keys) <= set(held.setup.neighbours):
        raise ProtocolError("public keys of nodes that are not this node's neighbours")
    if keys.get(held.node_id) != held.public:
        raise ProtocolError("the server misquotes this node's own public keys")
    if len(keys) < t:
        raise ProtocolError(
            f"{len(keys)} neighbours with keys, fewer than the threshold {t}"
        )
    every_key = [k for pair in keys.values() for k in (pair.encryption, pair.masking)]
    if len(set(every_key)) != len(every_key):
        raise ProtocolError("two neighbours advertise the same public key")
    held.peers = dict(keys)
    held.mask_seed = new_secret()
    holders = sorted(keys)
    seed_shares = split(held.mask_seed, t, len(holders))
    key_shares = split(held.masking_key, t, len(holders))
    nodes, ciphertexts = [], []
    for holder, seed_share, key_share in zip(holders, seed_shares, key_shares, strict=True):
        if holder == held.node_id:
            held.seed_shares[holder], held.key_shares[holder] = seed_share, key_share
            continue
        channel = fernet_key(
            agree(held.encryption_key, keys[holder].encryption, ENCRYPTION)
        )
        plaintext = share_keys_plaintext_concat(held.node_id, holder, seed_share, key_share)
        nodes.append(holder)
        ciphertexts.append(encrypt(channel, plaintext))
    held.stage = Stage.SHARE_KEYS
    _save(context, held)
    reply = EncryptedShares(instruction.server_round, tuple(nodes), tuple(ciphertexts))
    return reply.to_record(Stage.SHARE_KEYS)


# -- stage 3 ---------------------------------------------------------------------------
def receive_shares(context: Context, record: ConfigRecord) -> RoundSecrets:
    """Decrypt the shares the neighbours sent; they become this round's mask partners."""
    forward = EncryptedShares.from_record(record, Stage.MASKED_UPDATE)
    held = load_secrets(context, Stage.SHARE_KEYS, forward.server_round)
    for sender, ciphertext in zip(forward.nodes, forward.ciphertexts, strict=True):
        if sender == held.node_id or sender not in held.peers:
            raise ProtocolError(f"shares from node {sender}, which is not a neighbour")
        channel = fernet_key(
            agree(held.encryption_key, held.peers[sender].encryption, ENCRYPTION)
        )
        try:
            plaintext = decrypt(channel, ciphertext)
        except Exception:  # Fernet's InvalidToken: tampered or misrouted
            raise ProtocolError(f"the shares from node {sender} do not decrypt") from None
        source, destination, seed_share, key_share = share_keys_plaintext_separate(
            plaintext
        )
        if (source, destination) != (sender, held.node_id):
            raise ProtocolError(f"shares from node {sender} were addressed elsewhere")
        held.seed_shares[sender], held.key_shares[sender] = seed_share, key_share
    held.partners = tuple(sorted(forward.nodes))
    if len(held.partners) + 1 < held.setup.threshold:
        raise ProtocolError(
            f"shares from {len(held.partners)} neighbours: with this node, fewer than "
            f"the threshold {held.setup.threshold}"
        )
    return held


def masked_upload(
    context: Context, held: RoundSecrets, clipped_change: list[np.ndarray]
) -> ArrayRecord:
    """Noise, quantise and mask the clipped change; the round moves to unmasking."""
    plan = held.setup.plan
    server_round = held.setup.server_round
    signs = rotation_signs(held.setup.rotation_seed, plan.padded_dim)
    values = plan.encode(clipped_change, signs, integer_generator())
    bits, nonce = plan.modulus_bits, mask_nonce(server_round)
    modulus = np.uint64(plan.modulus)
    total = (values + mask(held.mask_seed, values.size, bits, nonce)) % modulus
    for partner in held.partners:
        seed = agree(held.masking_key, held.peers[partner].masking, MASKING)
        pairwise = mask(seed, values.size, bits, nonce)
        # the larger id adds, the smaller subtracts: the pair cancels in the sum
        total = (total + pairwise if held.node_id > partner else total - pairwise) % modulus
    held.stage = Stage.MASKED_UPDATE
    _save(context, held)
    return ArrayRecord({PACKED_ARRAY: Array(pack(total, bits))})


# -- stage 4 ---------------------------------------------------------------------------
def unmask(context: Context, record: ConfigRecord) -> ConfigRecord:
    """Reveal shares: mask seeds of neighbours that uploaded, mask keys of those that
    dropped after sharing. Answered once; the round's secrets are wiped after."""
    instruction = UnmaskInstruction.from_record(record)
    held = load_secrets(context, Stage.MASKED_UPDATE, instruction.server_round)
    forget(context)  # whatever happens next, never a second answer for this round
    if held.node_id not in instruction.uploaded:
        raise ProtocolError("the server asks this node to unmask without its upload")
    minimum = held.setup.plan.min_contributors
    if instruction.contributors < minimum:
        raise ProtocolError(
            f"{instruction.contributors} uploads carry less noise than the round's "
            f"minimum of {minimum}: this node does not help unmask them"
        )
    holders = set(held.seed_shares)
    listed = set(instruction.uploaded) | set(instruction.dropped)
    if not listed <= holders:
        raise ProtocolError("the server asks for shares this node never held")
    if not set(instruction.dropped) <= set(held.partners):
        raise ProtocolError("a node listed as dropped never shared keys with this node")
    revealed = RevealedShares(
        {n: held.seed_shares[n] for n in instruction.uploaded},
        {n: held.key_shares[n] for n in instruction.dropped},
    )
    return revealed.to_record()


def stage_record(content: Any) -> ConfigRecord:
    """The ``secagg`` record of an instruction."""
    if SECAGG_KEY not in content.config_records:
        raise ProtocolError(f"the instruction has no {SECAGG_KEY!r} record")
    return content.config_records[SECAGG_KEY]
