"""The server's side of secure aggregation: four exchanges, then only the sum.

The stages and their schemas are :mod:`common.secure_aggregation.protocol`'s.
Dropout follows SecAgg+: a client lost before sharing keys is simply left out; one
lost after
sharing but before uploading has its mask key rebuilt from its neighbours' shares,
so the pairwise masks the others added for it can be removed; one lost after
uploading has its mask seed rebuilt, so its upload stays in the sum. Every rebuilt
secret needs t shares, and no holder ever reveals both secrets of one node.

What this process ever holds of a client: its public keys, ciphertexts it cannot
read, its masked upload, and — after unmasking — mask seeds of uploaders and mask
keys of clients whose upload it does not have. It removes the masks from the sum
of the uploads, never from one upload. A round whose uploads are fewer than the
round's minimum, or one whose secrets cannot all be rebuilt, fails without
unmasking anything.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from common.config import RunConfig
from common.secure_aggregation.distributed_dp import QuantisationPlan
from common.secure_aggregation.keys import MASKING, agree, combine
from common.secure_aggregation.masks import mask, mask_nonce, unpack
from common.secure_aggregation.plan import round_sizes
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
from common.wire.reply import TrainReport
from common.wire.reply_fields import MASKED_KEY, ReplyError, Status
from server.messaging import content_bytes, exchange
from server.results.client_outcomes import ClientOutcome


@dataclass(frozen=True)
class Layout:
    """Who shares secrets with whom this round, t, and the least number of uploads."""

    neighbours: dict[int, tuple[int, ...]]  # node -> its neighbourhood, itself included
    threshold: int
    min_contributors: int

    @property
    def cohort(self) -> tuple[int, ...]:
        """Every node of the round."""
        return tuple(self.neighbours)


def round_layout(cohort: Sequence[int], cfg: RunConfig, rng: random.Random) -> Layout:
    """SecAgg+'s graph: the cohort in a random ring, each node with the ⌊k/2⌋ nodes on
    either side (every node, if the cohort is not larger); t and the minimum of
    uploads as :func:`common.secure_aggregation.plan.round_sizes` gives them."""
    nodes = list(cohort)
    if len(set(nodes)) != len(nodes):
        raise ValueError("a node is in the cohort twice")
    shares, threshold, minimum = round_sizes(cfg, len(nodes))
    rng.shuffle(nodes)
    size, half = len(nodes), shares // 2
    if shares == size:
        neighbours = {n: tuple(nodes) for n in nodes}
    else:
        neighbours = {
            n: tuple(nodes[(i + off) % size] for off in range(-half, half + 1))
            for i, n in enumerate(nodes)
        }
    return Layout(neighbours, threshold, minimum)


@dataclass
class SecAggResult:
    """What one round of the protocol produced."""

    total: np.ndarray | None  # the unmasked sum mod 2^b; None when the round failed
    failure: str | None
    uploads: dict[int, Message]  # the masked-update replies whose uploads are summed
    answers: list[Message]  # every other reply carrying a report (refusals, errors)
    errors: list[Message]  # replies that failed in Flower (no content)
    # uploads kept out of the sum: off-size (the reason), or refused by ``admit``
    rejected: dict[int, str] = field(default_factory=dict)
    excluded: list[ClientOutcome] = field(default_factory=list)
    admitted: dict[int, ClientOutcome] = field(default_factory=dict)  # uploads summed
    dropped: dict[str, list[int]] = field(default_factory=dict)  # stage -> nodes lost
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    exchange_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # each exchange

    @property
    def contributors(self) -> tuple[int, ...]:
        """Nodes whose uploads the sum holds (U3)."""
        return tuple(sorted(self.uploads))


class SecAggRound:
    """Runs one round of the protocol through ``grid``."""

    def __init__(
        self,
        grid: Grid,
        server_round: int,
        layout: Layout,
        plan: QuantisationPlan,
        rotation_seed: bytes,
        stage_timeout: float,
        train_timeout: float,
        clock: Callable[[], float],
    ) -> None:
        self.grid = grid
        self.round = server_round
        self.layout = layout
        self.plan = plan
        self.rotation_seed = rotation_seed
        self.stage_timeout = stage_timeout
        self.train_timeout = train_timeout
        self.clock = clock
        self.result = SecAggResult(None, None, {}, [], [])

    # -- plumbing -----------------------------------------------------------------------
    def _exchange(
        self, stage: Stage, contents: dict[int, RecordDict], timeout: float
    ) -> dict[int, Message]:
        messages = [
            Message(content, dst_node_id=node, message_type=stage.message_type)
            for node, content in contents.items()
        ]
        for node, content in contents.items():
            self.result.bytes_down[node] = self.result.bytes_down.get(node, 0) + (
                content_bytes(content)
            )
        started = self.clock()
        replies = exchange(self.grid, messages, timeout)
        elapsed = self.clock() - started
        self.result.exchange_seconds += elapsed
        self.result.stage_seconds[stage.value] = round(elapsed, 4)
        answered: dict[int, Message] = {}
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if node not in contents or node in answered:
                continue
            if reply.has_error():
                self.result.errors.append(reply)
                continue
            self.result.bytes_up[node] = self.result.bytes_up.get(node, 0) + (
                content_bytes(reply.content)
            )
            answered[node] = reply
        return answered

    def _stage_records(self, stage: Stage, replies: dict[int, Message]) -> dict[int, Any]:
        """The ``secagg`` records of the replies; a reply with a report instead (a
        refusal or a node error) is kept for the round's outcomes."""
        records = {}
        for node, reply in replies.items():
            if SECAGG_KEY in reply.content.config_records:
                records[node] = reply.content.config_records[SECAGG_KEY]
            else:
                self.result.answers.append(reply)
        return records

    def _fail(self, why: str) -> SecAggResult:
        self.result.failure = f"round {self.round}: secure aggregation failed: {why}"
        self.result.total = None
        return self.result

    def _lost(self, stage: Stage, before: set[int], after: set[int]) -> None:
        self.result.dropped[stage.value] = sorted(before - after)

    def _reachable(self, alive: set[int]) -> str | None:
        """Why some node can no longer have its secrets rebuilt (fewer than t live
        neighbours), or ``None``."""
        t = self.layout.threshold
        for node in sorted(alive):
            live = alive.intersection(self.layout.neighbours[node])
            if len(live) < t:
                return f"node {node} has {len(live)} live neighbours, fewer than t = {t}"
        return None

    # -- the four stages ----------------------------------------------------------------
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
        keys = self._setup()
        advertised = set(keys)
        self._lost(Stage.SETUP, cohort, advertised)
        why = self._reachable(advertised)
        if why:
            return self._fail(f"after key advertisement: {why}")
        shares = self._share_keys(keys)
        shared = set(shares)
        self._lost(Stage.SHARE_KEYS, advertised, shared)
        why = self._reachable(shared)
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
        revealed = self._unmask(uploaded, shared - uploaded)
        self._lost(Stage.UNMASK, uploaded, set(revealed))
        return self._sum(keys, uploads, revealed, shared - uploaded)

    def _setup(self) -> dict[int, PublicKeys]:
        contents = {
            node: RecordDict(
                {
                    SECAGG_KEY: SetupInstruction(
                        self.round,
                        neighbours,
                        self.layout.threshold,
                        self.plan,
                        self.rotation_seed,
                    ).to_record()
                }
            )  # fmt: skip
            for node, neighbours in self.layout.neighbours.items()
        }
        records = self._stage_records(
            Stage.SETUP, self._exchange(Stage.SETUP, contents, self.stage_timeout)
        )
        keys: dict[int, PublicKeys] = {}
        for node, record in records.items():
            try:
                keys[node] = PublicKeys.from_record(record)
            except ProtocolError:
                continue  # off-schema: dropped before it could share anything
        return keys

    def _share_keys(self, keys: dict[int, PublicKeys]) -> dict[int, EncryptedShares]:
        contents = {}
        for node in keys:
            visible = {n: keys[n] for n in self.layout.neighbours[node] if n in keys}
            contents[node] = RecordDict(
                {SECAGG_KEY: KeysInstruction(self.round, visible).to_record()}
            )
        records = self._stage_records(
            Stage.SHARE_KEYS, self._exchange(Stage.SHARE_KEYS, contents, self.stage_timeout)
        )
        shares: dict[int, EncryptedShares] = {}
        for node, record in records.items():
            expected = {n for n in self.layout.neighbours[node] if n in keys} - {node}
            try:
                sent = EncryptedShares.from_record(record, Stage.SHARE_KEYS)
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

    def _unmask(self, uploaded: set[int], dropped: set[int]) -> dict[int, RevealedShares]:
        contents = {}
        for node in uploaded:
            hood = self.layout.neighbours[node]
            instruction = UnmaskInstruction(
                self.round,
                tuple(n for n in hood if n in uploaded),
                tuple(n for n in hood if n in dropped),
                len(uploaded),
            )
            contents[node] = RecordDict({SECAGG_KEY: instruction.to_record()})
        records = self._stage_records(
            Stage.UNMASK, self._exchange(Stage.UNMASK, contents, self.stage_timeout)
        )
        revealed: dict[int, RevealedShares] = {}
        for node, record in records.items():
            try:
                answer = RevealedShares.from_record(record)
            except ProtocolError:
                continue
            hood = self.layout.neighbours[node]
            if set(answer.seed_shares) == {n for n in hood if n in uploaded} and set(
                answer.key_shares
            ) == {n for n in hood if n in dropped}:
                revealed[node] = answer
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
        keys: dict[int, PublicKeys],
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
                seed = agree(private, keys[j].masking, MASKING)
                pairwise = mask(seed, count, bits, nonce)
                # j added +mask if j > v, else −mask: take it back out
                total = (total - pairwise if j > v else total + pairwise) % modulus
        self.result.uploads = uploads
        self.result.total = total
        return self.result
