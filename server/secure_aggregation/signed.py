"""The server's own checks of what clients sign: it forwards only what will verify.

Clients trust none of this (each checks every certificate against its CA and every
signature itself, :mod:`client.secure_aggregation.verification`); the server checks
so that one broken or forged reply costs only that node, not the round: a node
whose advertisement or uploader signature does not verify under the key its
certificate names is left out like a node that dropped. The server does not hold
the CA of the node identities, so it cannot tell a certified key from another.
"""

from __future__ import annotations

from collections.abc import Mapping

from common.secure_aggregation.consistency import (
    Advertisement,
    advert_digest,
    advert_message,
    participants_digest,
    plan_digest,
    uploaders_message,
)
from common.secure_aggregation.identity import (
    IdentityError,
    certified_key_unchecked,
    verify_signature,
)
from common.secure_aggregation.protocol import SetupInstruction


class SignedView:
    """The round's advertisements as the server checked them."""

    def __init__(self, run_id: int, setup: SetupInstruction) -> None:
        self.run_id = run_id
        self.setup = setup
        self.plan = plan_digest(setup)
        self.adverts: dict[int, Advertisement] = {}
        self.identities: dict[int, bytes] = {}
        self.digests: dict[int, bytes] = {}

    def admit_adverts(self, adverts: Mapping[int, Advertisement]) -> None:
        """Keep the adverts whose signature checks under their certificate's key and
        whose identity no other node already used."""
        seen: set[bytes] = set()
        for node in sorted(adverts):
            advert = adverts[node]
            try:
                identity = certified_key_unchecked(advert.certificate)
            except IdentityError:
                continue
            message = advert_message(
                self.run_id, self.setup.server_round, node, advert.keys, self.plan
            )
            if identity in seen or not verify_signature(
                identity, advert.signature, message
            ):
                continue
            seen.add(identity)
            self.adverts[node] = advert
            self.identities[node] = identity
            self.digests[node] = advert_digest(message)

    def valid_signatures(
        self, uploaded: tuple[int, ...], signatures: Mapping[int, bytes]
    ) -> dict[int, bytes]:
        """The signatures on U that verify, by signer."""
        participants = participants_digest(self.identities)
        valid = {}
        for signer, signature in signatures.items():
            if signer not in self.identities:
                continue
            message = uploaders_message(
                self.run_id, self.setup.server_round, self.digests[signer],
                participants, uploaded, self.identities,
            )  # fmt: skip
            if verify_signature(self.identities[signer], signature, message):
                valid[signer] = signature
        return valid
