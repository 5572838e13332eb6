"""A client's checks of what other nodes signed: it counts only what it verified.

Against an active server, the server's word on who takes part, how many uploaded
and who agreed to unmask is worth nothing; a node's certified signature is. Here
a client checks every participant's key advertisement (share keys) and every
signature on the uploader set (unmask) against the CA it trusts, and refuses the
round, naming the node, when one does not check.
"""

from __future__ import annotations

from collections.abc import Mapping

from client.secure_aggregation.state import RoundSecrets
from common.secure_aggregation.consistency import (
    Advertisement,
    UnmaskInstruction,
    advert_digest,
    advert_message,
    global_quorum,
    participants_digest,
    plan_digest,
    uploaders_message,
)
from common.secure_aggregation.identity import (
    IdentityError,
    fingerprint,
    verify_certificate,
    verify_signature,
)
from common.secure_aggregation.protocol import ProtocolError


def verify_adverts(
    held: RoundSecrets, adverts: Mapping[int, Advertisement], ca_certificate: bytes
) -> None:
    """Check every participant's advertisement; keep the verified identities.

    Each must carry a certificate of the CA, signed by that certified key over the
    node id, its keys, this run and round and the same plan this node was sent;
    no identity may appear under two node ids (one device, one vote).
    """
    plan = plan_digest(held.setup)
    identities: dict[int, bytes] = {}
    digests: dict[int, bytes] = {}
    owners: dict[bytes, int] = {}
    for node in sorted(adverts):
        advert = adverts[node]
        try:
            identity = verify_certificate(advert.certificate, ca_certificate)
        except IdentityError as exc:
            raise ProtocolError(f"node {node}'s identity is not certified: {exc}") from None
        message = advert_message(
            held.run_id, held.setup.server_round, node, advert.keys, plan
        )
        if not verify_signature(identity, advert.signature, message):
            raise ProtocolError(
                f"node {node}'s key advertisement is not signed by its certified "
                "identity for this run, round and plan"
            )
        if identity in owners:
            raise ProtocolError(
                f"one identity ({fingerprint(identity)}) advertises as nodes "
                f"{owners[identity]} and {node}"
            )
        owners[identity] = node
        identities[node] = identity
        digests[node] = advert_digest(message)
    mine = adverts.get(held.node_id)
    if mine is None or mine.keys != held.public:
        raise ProtocolError("the server misquotes this node's own public keys")
    held.identities, held.advert_digests = identities, digests


def uploaders_to_sign(held: RoundSecrets, uploaded: tuple[int, ...]) -> bytes:
    """The message this node signs for U (after checking U is signable)."""
    if held.node_id not in uploaded:
        raise ProtocolError("the uploader set leaves out this node's own upload")
    strangers = sorted(set(uploaded) - set(held.identities))
    if strangers:
        raise ProtocolError(
            f"the uploader set names nodes {strangers}, which are not certified "
            "participants of this round"
        )
    minimum = held.setup.plan.min_contributors
    if len(uploaded) < minimum:
        raise ProtocolError(
            f"{len(uploaded)} uploads carry less noise than the round's minimum of "
            f"{minimum}: this node does not sign them"
        )
    return _uploaders(held, held.node_id, uploaded)


def _uploaders(held: RoundSecrets, signer: int, uploaded: tuple[int, ...]) -> bytes:
    return uploaders_message(
        held.run_id,
        held.setup.server_round,
        held.advert_digests[signer],
        participants_digest(held.identities),
        uploaded,
        held.identities,
    )


def neighbour_quorum(threshold: int) -> int:
    """t of a holder's own neighbours (itself included) must sign its U.

    This is what holds in any graph the server draws: a node whose holders reveal
    its mask key in one view cannot gather t of the same (k < 2t) holders' signatures
    on another view, so it cannot help reveal a partner's seed there
    (docs/secure-aggregation.md, *Why it holds*).
    """
    return threshold


def verified_signers(held: RoundSecrets, instruction: UnmaskInstruction) -> set[int]:
    """The certified participants whose signatures on U check; the unmask request is
    refused unless U is the set this node signed, at least t of the signers are its
    neighbours, and they are at least m and more than half the participants."""
    uploaded = tuple(sorted(instruction.uploaded))
    if uploaded != tuple(sorted(held.signed)):
        raise ProtocolError(
            "the uploader set differs from the one this node signed: the server shows "
            "different sets to different nodes"
        )
    signers = set()
    for signer, signature in sorted(instruction.signatures.items()):
        if signer not in held.identities:
            raise ProtocolError(f"a signature from node {signer}, not a participant")
        if not verify_signature(
            held.identities[signer], signature, _uploaders(held, signer, uploaded)
        ):
            raise ProtocolError(
                f"node {signer}'s signature is not on this uploader set in this round "
                "by its certified identity"
            )
        signers.add(signer)
    t = neighbour_quorum(held.setup.threshold)
    near = len(signers & set(held.peers))
    if near < t:
        raise ProtocolError(
            f"{near} of this node's neighbours signed the uploader set, fewer than t = {t}"
        )
    needed = max(held.setup.plan.min_contributors, global_quorum(len(held.identities)))
    if len(signers) < needed:
        raise ProtocolError(
            f"{len(signers)} certified signatures on the uploader set, fewer than the "
            f"{needed} needed (the round's minimum m, and more than half of the "
            f"{len(held.identities)} participants)"
        )
    return signers
