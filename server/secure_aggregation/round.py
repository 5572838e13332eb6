"""The server's side of secure aggregation: five exchanges, then only the sum.

The stages and their schemas are :mod:`common.secure_aggregation.protocol`'s and
:mod:`common.secure_aggregation.consistency`'s. Dropout follows SecAgg+: a client
lost before sharing keys is simply left out; one lost after sharing but before
uploading has its mask key rebuilt from its neighbours' shares, so the pairwise
masks the others added for it can be removed; one lost after uploading has its
mask seed rebuilt, so its upload stays in the sum. Every rebuilt secret needs t
shares, and no holder ever reveals both secrets of one node.

Between upload and unmask, the consistency stage (Bonawitz et al. 2017, §4) has
every uploader sign the uploader set U; unmask carries U and the signatures, and
each holder reveals shares only for the U it signed, once it verified enough
certified signatures on it (:mod:`client.secure_aggregation.verification`).

What this process ever holds of a client: its public keys and identity
certificate, ciphertexts it cannot read, its masked upload, its signatures, and —
after unmasking — mask seeds of uploaders and mask keys of clients whose upload it
does not have. It removes the masks from the sum of the uploads, never from one
upload. A round whose uploads or signatures are fewer than the round's minimum, or
one whose secrets cannot all be rebuilt, fails without unmasking anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Message, RecordDict

from common.secure_aggregation.consistency import (
    Advertisement,
    ConsistencyInstruction,
    KeysInstruction,
    UnmaskInstruction,
    global_quorum,
    signature_from_record,
)
from common.secure_aggregation.keys import MASKING, agree, combine
from common.secure_aggregation.masks import mask, mask_nonce, unpack
from common.secure_aggregation.protocol import (
    EPSILON_KEY,
    PACKED_ARRAY,
    SECAGG_KEY,
    EncryptedShares,
    ProtocolError,
    RevealedShares,
    SetupInstruction,
    Stage,
)
from common.wire.reply import TrainReport
from common.wire.reply_fields import MASKED_KEY, ReplyError, Status
from server.results.client_outcomes import ClientOutcome
from server.secure_aggregation.exchanges import RoundExchanges
from server.secure_aggregation.layout import Layout, SecAggResult, round_layout
from server.secure_aggregation.signed import SignedView

__all__ = ["Layout", "SecAggResult", "SecAggRound", "round_layout"]
# what the identity layer adds to a stage's instruction (bytes per advert, per node)
IDENTITY_FIELDS = ("identity-certificate", "advert-signature")


class SecAggRound(RoundExchanges):
    """Runs one round of the protocol through ``grid``."""

    # -- the five stages ----------------------------------------------------------------
    def run(
        self,
        train_content: Callable[[int], RecordDict],
        admit: Callable[[Message], ClientOutcome],
    ) -> SecAggResult:
        """All stages; ``train_content(node)`` is the masked-update instruction's
        model and config for ``node``; ``admit(reply)`` checks an upload's report
        before the upload may join the sum (anything but ``trained`` keeps it out,
        and the node counts as dropped after sharing)."""
        cohort = set(self.layout.cohort)
        view = self._setup()
        advertised = set(view.adverts)
        self._lost(Stage.SETUP, cohort, advertised)
        why = self._reachable(advertised) or self._short(advertised, "advertised keys")
        if why:
            return self._fail(f"after key advertisement: {why}")
        shares = self._share_keys(view)
        shared = set(shares)
        self._lost(Stage.SHARE_KEYS, advertised, shared)
        why = self._reachable(shared) or self._short(shared, "shared keys")
        if why:
            return self._fail(f"after key sharing: {why}")
        uploads = self._masked_updates(shares, train_content, admit)
        uploaded = set(uploads)
        self._lost(Stage.MASKED_UPDATE, shared, uploaded)
        minimum = self.layout.min_contributors
        if len(uploaded) < minimum:
            return self._fail(
                f"{len(uploaded)} of {len(cohort)} clients uploaded, fewer than the "
                f"round's minimum of {minimum}; nothing was unmasked"
            )
        why = self._reachable(uploaded)
        if why:
            return self._fail(f"after upload: {why}; nothing was unmasked")
        signatures = self._consistency(view, tuple(sorted(uploaded)))
        signers = set(signatures)
        self._lost(Stage.CONSISTENCY, uploaded, signers)
        needed = max(minimum, global_quorum(len(view.adverts)))
        if len(signers) < needed:
            return self._fail(
                f"{len(signers)} uploaders signed the uploader set, fewer than the "
                f"{needed} the holders require; nothing was unmasked"
            )
        why = self._reachable(signers)
        if why:
            return self._fail(f"after consistency: {why}; nothing was unmasked")
        revealed = self._unmask(tuple(sorted(uploaded)), signatures)
        self._lost(Stage.UNMASK, signers, set(revealed))
        return self._sum(view.adverts, uploads, revealed, shared - uploaded)

    def _setup(self) -> SignedView:
        instructions = {
            node: SetupInstruction(
                self.round,
                neighbours,
                self.layout.threshold,
                self.plan,
                self.rotation_seed,
            )  # fmt: skip
            for node, neighbours in self.layout.neighbours.items()
        }
        contents = {
            node: RecordDict({SECAGG_KEY: instruction.to_record()})
            for node, instruction in instructions.items()
        }
        replies = self._exchange(Stage.SETUP, contents, self.stage_timeout)
        records = self._stage_records(Stage.SETUP, replies)
        run_ids = {int(r.metadata.run_id) for r in replies.values()}
        view = SignedView(
            run_ids.pop() if len(run_ids) == 1 else 0, next(iter(instructions.values()))
        )
        adverts: dict[int, Advertisement] = {}
        for node, record in records.items():
            try:
                adverts[node] = Advertisement.from_reply(node, record)
            except ProtocolError:
                continue  # off-schema: dropped before it could share anything
            extra = sum(len(record[k]) for k in IDENTITY_FIELDS)
            self._identity_bytes("setup_up", extra)
        view.admit_adverts(adverts)
        return view

    def _share_keys(self, view: SignedView) -> dict[int, EncryptedShares]:
        # every participant's signed advertisement, the same for every node
        record = KeysInstruction(self.round, view.adverts).to_record()
        contents = {node: RecordDict({SECAGG_KEY: record}) for node in view.adverts}
        signed = sum(len(a.certificate) + len(a.signature) for a in view.adverts.values())
        for node in contents:  # certificates, signatures, and keys beyond the neighbours
            hood = set(self.layout.neighbours[node])
            beyond = sum(
                len(a.keys.encryption) + len(a.keys.masking) + 8
                for n, a in view.adverts.items()
                if n not in hood
            )
            self._identity_bytes("share_keys_down", signed + beyond)
        records = self._stage_records(
            Stage.SHARE_KEYS, self._exchange(Stage.SHARE_KEYS, contents, self.stage_timeout)
        )
        shares: dict[int, EncryptedShares] = {}
        keys = view.adverts
        for node, reply in records.items():
            expected = {n for n in self.layout.neighbours[node] if n in keys} - {node}
            try:
                sent = EncryptedShares.from_record(reply, Stage.SHARE_KEYS)
            except ProtocolError:
                continue
            if sent.server_round == self.round and set(sent.nodes) == expected:
                shares[node] = sent
        return shares

    def _masked_updates(
        self,
        shares: dict[int, EncryptedShares],
        train_content: Callable[[int], RecordDict],
        admit: Callable[[Message], ClientOutcome],
    ) -> dict[int, Message]:
        inbox: dict[int, list[tuple[int, bytes]]] = {node: [] for node in shares}
        for sender, sent in shares.items():
            for holder, ciphertext in zip(sent.nodes, sent.ciphertexts, strict=True):
                if holder in inbox:  # a holder that failed to share gets nothing
                    inbox[holder].append((sender, ciphertext))
        contents = {}
        for node, received in inbox.items():
            forward = EncryptedShares(
                self.round, tuple(s for s, _ in received), tuple(c for _, c in received)
            )
            content = train_content(node)
            content[SECAGG_KEY] = forward.to_record(Stage.MASKED_UPDATE)
            contents[node] = content
        replies = self._exchange(Stage.MASKED_UPDATE, contents, self.train_timeout)
        uploads: dict[int, Message] = {}
        length = (self.plan.padded_dim * self.plan.modulus_bits + 7) // 8
        for node, reply in replies.items():
            try:
                report = TrainReport.from_content(reply.content)
            except ReplyError:
                report = None
            if report is None or report.status is not Status.TRAINED or not report.masked:
                self.result.answers.append(reply)  # a refusal, or off the contract
                continue
            packed = reply.content.array_records[MASKED_KEY].get(PACKED_ARRAY)
            array = packed.numpy() if packed is not None else None
            if array is None or array.dtype != np.uint8 or array.shape != (length,):
                self.result.rejected[node] = (
                    f"masked upload rejected: not a uint8 vector of {length} bytes"
                )
                continue  # treated as dropped after sharing: its pairwise masks go
            outcome = admit(reply)
            if outcome.status is not Status.TRAINED:
                self.result.excluded.append(outcome)
                continue
            self.result.admitted[node] = outcome
            uploads[node] = reply
        return uploads

    def _consistency(self, view: SignedView, uploaded: tuple[int, ...]) -> dict[int, bytes]:
        """Ask every uploader to sign U; keep the signatures that verify."""
        record = ConsistencyInstruction(self.round, uploaded).to_record()
        contents = {node: RecordDict({SECAGG_KEY: record}) for node in uploaded}
        records = self._stage_records(
            Stage.CONSISTENCY,
            self._exchange(Stage.CONSISTENCY, contents, self.stage_timeout),
        )
        totals = self.result.stage_bytes[Stage.CONSISTENCY.value]
        self._identity_bytes("consistency_down", totals["down"])
        self._identity_bytes("consistency_up", totals["up"])
        signatures = {}
        for node, reply in records.items():
            try:
                signatures[node] = signature_from_record(reply)
            except ProtocolError:
                continue
        valid = view.valid_signatures(uploaded, signatures)
        self.result.signers = tuple(sorted(valid))
        return valid

    def _unmask(
        self, uploaded: tuple[int, ...], signatures: dict[int, bytes]
    ) -> dict[int, RevealedShares]:
        """Send U and its signatures to every signer; keep the answers that reveal
        seeds only of U and keys only outside it."""
        record = UnmaskInstruction(self.round, uploaded, signatures).to_record()
        contents = {node: RecordDict({SECAGG_KEY: record}) for node in signatures}
        size = sum(len(v) for v in signatures.values()) + 8 * len(signatures)
        self._identity_bytes("unmask_down", size * len(contents))
        records = self._stage_records(
            Stage.UNMASK, self._exchange(Stage.UNMASK, contents, self.stage_timeout)
        )
        revealed: dict[int, RevealedShares] = {}
        inside = set(uploaded)
        for node, reply in records.items():
            try:
                answer = RevealedShares.from_record(reply)
            except ProtocolError:
                continue
            hood = set(self.layout.neighbours[node])
            if set(answer.seed_shares) <= inside & hood and not (
                set(answer.key_shares) & inside or set(answer.key_shares) - hood
            ):
                revealed[node] = answer
                epsilon = reply.get(EPSILON_KEY)
                if isinstance(epsilon, float):
                    self.result.client_epsilons[node] = epsilon
        return revealed

    def _rebuild_all(
        self, owners: Iterable[int], revealed: dict[int, RevealedShares], what: str
    ) -> dict[int, bytes]:
        """Each owner's ``what`` ("mask seed" or "mask key") from the revealed shares."""
        out = {}
        for owner in owners:
            held = [
                (r.seed_shares if what == "mask seed" else r.key_shares).get(owner)
                for r in revealed.values()
            ]
            out[owner] = self._rebuild(owner, [h for h in held if h is not None], what)
        return out

    def _rebuild(self, owner: int, shares: list[bytes], what: str) -> bytes:
        t = self.layout.threshold
        if len(shares) < t:
            raise ProtocolError(
                f"node {owner}'s {what} has {len(shares)} shares, fewer than t = {t}; "
                "the sum cannot be unmasked and nothing was revealed"
            )
        try:
            secret = combine(shares[:t])
        except ValueError:
            raise ProtocolError(f"node {owner}'s {what} shares do not combine") from None
        return secret

    def _sum(
        self,
        keys: dict[int, Advertisement],
        uploads: dict[int, Message],
        revealed: dict[int, RevealedShares],
        dropped: set[int],
    ) -> SecAggResult:
        plan = self.plan
        count, bits = plan.padded_dim, plan.modulus_bits
        modulus = np.uint64(plan.modulus)
        nonce = mask_nonce(self.round)
        try:
            seeds = self._rebuild_all(uploads, revealed, "mask seed")
            mask_keys = self._rebuild_all(dropped, revealed, "mask key")
        except (ProtocolError, ValueError) as exc:
            return self._fail(str(exc))
        total = np.zeros(count, dtype=np.uint64)
        for reply in uploads.values():  # only ever the sum of the uploads
            packed = reply.content.array_records[MASKED_KEY][PACKED_ARRAY].numpy()
            total = (total + unpack(packed, bits, count)) % modulus
        for seed in seeds.values():
            total = (total - mask(seed, count, bits, nonce)) % modulus
        for v, private in mask_keys.items():
            for j in self.layout.neighbours[v]:
                if j not in uploads:
                    continue  # only uploaders added a pairwise mask with v
                seed = agree(private, keys[j].keys.masking, MASKING)
                pairwise = mask(seed, count, bits, nonce)
                # j added +mask if j > v, else −mask: take it back out
                total = (total - pairwise if j > v else total + pairwise) % modulus
        self.result.uploads = uploads
        self.result.total = total
        return self.result
