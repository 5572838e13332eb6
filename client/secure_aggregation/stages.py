"""A client's side of secure aggregation with distributed DP, one stage per message.

The stages are declared in :mod:`common.secure_aggregation.protocol`. Between stages the
round's secrets live in ``context.state`` (:mod:`client.secure_aggregation.state`),
never on disk, and are wiped after the unmask stage. Keys, seeds and shares come
from :mod:`common.secure_aggregation.keys` (X25519 and HKDF from ``cryptography``,
Flower's Fernet encryption, pycryptodome's Shamir sharing) and ``os.urandom``;
masks from AES-CTR (:mod:`common.secure_aggregation.masks`); the Skellam noise and
the rounding from OS entropy; signatures from the node's certified Ed25519 identity
(:mod:`common.secure_aggregation.identity`).

The client refuses (``ProtocolError``) anything a server could use to unmask it
alone or to shrink its noise: a stage out of order or from another round, its own
keys misquoted, an advertisement or signature that does not check against its CA,
a plan whose minimum m exceeds the certified participants it verified, too few
neighbours or partners for the threshold, a threshold of half the shares or fewer,
an uploader set other than the one it signed, fewer certified signatures on it than
t neighbours and m in all, a request that comes twice, or a second setup of a
round (a second incarnation of the node the server could place in another view).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from client.secure_aggregation.state import (
    STATE_KEY,
    RoundSecrets,
    claim_round,
    forget,
    load_secrets,
    save,
)
from client.secure_aggregation.verification import (
    uploaders_to_sign,
    verified_signers,
    verify_adverts,
)
from common.privacy.randomness import integer_generator
from common.secure_aggregation.consistency import (
    Advertisement,
    ConsistencyInstruction,
    KeysInstruction,
    UnmaskInstruction,
    advert_message,
    plan_digest,
    signature_record,
)
from common.secure_aggregation.distributed_dp import QuantisationPlan, rotation_signs
from common.secure_aggregation.identity import TrustedIdentity
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
    ProtocolError,
    PublicKeys,
    RevealedShares,
    SetupInstruction,
    Stage,
)

__all__ = ["STATE_KEY", "RoundSecrets", "forget", "load_secrets"]


# -- stage 1 ---------------------------------------------------------------------------
def setup(context: Context, node_id: int, record: ConfigRecord, dim: int,
          least_noise: float, trusted: TrustedIdentity) -> ConfigRecord:  # fmt: skip
    """Check the round's plan and answer with two fresh public keys, signed.

    ``dim`` is the model's parameter count and ``least_noise`` the least noise
    multiplier the node's policy accepts; a plan that disagrees is refused. The
    signature binds the keys to this node's certified identity, the node id the
    server gave it, the run, the round and the plan.
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
    claim_round(context, int(context.run_id), instruction.server_round)
    forget(context)  # a new round abandons any earlier one
    encryption, masking = new_secret(), new_secret()
    public = PublicKeys(public_key(encryption), public_key(masking))
    held = RoundSecrets(
        node_id=node_id,
        run_id=int(context.run_id),
        setup=instruction,
        stage=Stage.SETUP,
        encryption_key=encryption,
        masking_key=masking,
        public=public,
    )
    save(context, held)
    message = advert_message(
        held.run_id, instruction.server_round, node_id, public, plan_digest(instruction)
    )
    identity = trusted.identity
    advert = Advertisement(node_id, public, identity.certificate, identity.sign(message))
    return advert.to_reply()


# -- stage 2 ---------------------------------------------------------------------------
def share_keys(
    context: Context, record: ConfigRecord, ca_certificate: bytes
) -> ConfigRecord:
    """Check every participant's advertisement, then share the mask seed and the mask
    key among the neighbours, encrypted.

    The plan's minimum of uploads m may not exceed the certified participants this
    node verified: each upload carries V/m of the noise, and the noise multiplier
    holds only once m certified uploads are in the sum.
    """
    instruction = KeysInstruction.from_record(record)
    held = load_secrets(context, Stage.SETUP, instruction.server_round)
    verify_adverts(held, instruction.adverts, ca_certificate)
    minimum = held.setup.plan.min_contributors
    if minimum > len(held.identities):
        raise ProtocolError(
            f"the plan's minimum of {minimum} uploads exceeds the "
            f"{len(held.identities)} certified participants this node verified: its "
            "share of the noise would be too small"
        )
    keys = {
        n: instruction.adverts[n].keys
        for n in held.setup.neighbours
        if n in instruction.adverts
    }
    t = held.setup.threshold
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
    save(context, held)
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
    t, k = held.setup.threshold, len(held.peers)
    if len(held.partners) + 1 < t:
        raise ProtocolError(
            f"shares from {len(held.partners)} neighbours: with this node, fewer than "
            f"the threshold {t}"
        )
    if len(held.partners) < k - t + 1:
        # Otherwise t holders in U could rebuild this node's seed while every partner,
        # outside U, has its mask key rebuilt: this upload alone would be unmasked.
        raise ProtocolError(
            f"shares from {len(held.partners)} of {k - 1} neighbours: fewer than k - t "
            f"+ 1 = {k - t + 1}, so the server could unmask this upload alone"
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
    save(context, held)
    return ArrayRecord({PACKED_ARRAY: Array(pack(total, bits))})


# -- stage 4 ---------------------------------------------------------------------------
def consistency(
    context: Context, record: ConfigRecord, trusted: TrustedIdentity
) -> ConfigRecord:
    """Sign the uploader set U the server will sum (once per round): this node's
    upload among certified participants, at least the round's minimum of them."""
    instruction = ConsistencyInstruction.from_record(record)
    held = load_secrets(context, Stage.MASKED_UPDATE, instruction.server_round)
    uploaded = tuple(sorted(instruction.uploaded))
    signature = trusted.identity.sign(uploaders_to_sign(held, uploaded))
    held.signed, held.stage = uploaded, Stage.CONSISTENCY
    save(context, held)
    return signature_record(signature)


# -- stage 5 ---------------------------------------------------------------------------
def unmask(
    context: Context, record: ConfigRecord
) -> tuple[ConfigRecord, int, QuantisationPlan]:
    """Reveal shares for the uploader set this node signed, once it holds enough
    certified signatures on it: mask seeds of the neighbours in U, mask keys of the
    partners not in U. Answered once; the round's secrets are wiped first. Returns
    the reply, the count of certified signers (the uploads this node verified) and
    the round's plan."""
    instruction = UnmaskInstruction.from_record(record)
    held = load_secrets(context, Stage.CONSISTENCY, instruction.server_round)
    forget(context)  # whatever happens next, never a second answer for this round
    signers = verified_signers(held, instruction)
    uploaded = set(instruction.uploaded)
    revealed = RevealedShares(
        {n: share for n, share in held.seed_shares.items() if n in uploaded},
        {n: held.key_shares[n] for n in held.partners if n not in uploaded},
    )
    return revealed.to_record(), len(signers), held.setup.plan


def stage_record(content: Any) -> ConfigRecord:
    """The ``secagg`` record of an instruction."""
    if SECAGG_KEY not in content.config_records:
        raise ProtocolError(f"the instruction has no {SECAGG_KEY!r} record")
    return content.config_records[SECAGG_KEY]
