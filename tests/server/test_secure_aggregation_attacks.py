"""An active server against secure aggregation: each test plays the attacker.

Attack 1 (one upload unmasked): the server shows every holder its own uploader set,
built so that together they reveal one client's mask seed and its partners' mask
keys. Attack 2 (the noise floor): a plan whose minimum of uploads m exceeds the
certified participants, or an unmask request with fewer than m valid signatures.
Forgery: advertisements and signatures by uncertified keys, replayed from an
earlier round, or on another uploader set. Every honest client refuses, names the
reason and forgets the round's secrets; the server rebuilds nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Message

import client.secure_aggregation.stages as secagg_client
from common.secure_aggregation.consistency import (
    Advertisement,
    ConsistencyInstruction,
    KeysInstruction,
    UnmaskInstruction,
    advert_message,
    plan_digest,
    signature_from_record,
)
from common.secure_aggregation.distributed_dp import plan_skellam_round
from common.secure_aggregation.identity import CA_FILE, partition_file, read_identity
from common.secure_aggregation.keys import new_secret, public_key
from common.secure_aggregation.protocol import SECAGG_KEY, PublicKeys, RevealedShares, Stage
from common.wire.reply import TrainReport
from common.wire.reply_fields import Status
from server.secure_aggregation.round import SecAggRound
from server.secure_aggregation.signed import SignedView
from simulations.deployment.node_identity import deal_identities
from tests.helpers.secure_aggregation import (
    FIRST,
    NODES,
    Protocol,
    Stop,
    ask,
    run_to_signed,
    run_to_upload,
    secagg_cfg,
    server_identity,
    use_dealer,
)


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    server_identity(monkeypatch)


@pytest.fixture
def dealer(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    return use_dealer(tmp_path_factory.mktemp("dealer"), monkeypatch)


def _refused(reply: Message, why: str) -> None:
    report = TrainReport.from_content(reply.content)
    assert report.status is Status.POLICY_REFUSED, report
    assert why in str(report.reason), report.reason
    assert SECAGG_KEY not in reply.content.config_records


def _forgot(protocol: Protocol, node: int) -> bool:
    return secagg_client.STATE_KEY not in protocol.contexts[node].state.config_records


# -- attack 1: a different uploader set per holder ------------------------------------
def test_attack_1_per_holder_uploader_sets_are_refused_at_signing(
    tmp_path: Path, dealer: Path
) -> None:
    """The issue's attack: holder h is told U = {h, X}, so it would reveal X's seed
    share and the mask keys of X's other partners. Before the fix every holder
    answered and the server rebuilt X's vector. Now no holder signs a set of fewer
    than m uploads, and an unmask without its signature is refused."""
    protocol = Protocol(secagg_cfg(tmp_path))
    run_to_upload(protocol)
    target = FIRST
    for holder in sorted(protocol.contexts):
        if holder == target:
            continue
        told = ConsistencyInstruction(1, (holder, target))
        _refused(ask(protocol, holder, Stage.CONSISTENCY, told.to_record()), "minimum of 3")
        assert _forgot(protocol, holder)
        unmask = UnmaskInstruction(1, (holder, target), {})
        _refused(ask(protocol, holder, Stage.UNMASK, unmask.to_record()), "no secure-agg")


def test_attack_1_sets_padded_to_m_get_too_few_signatures(
    tmp_path: Path, dealer: Path
) -> None:
    """The attacker pads each holder's set to m so it gets signed: U_h = {h, X, y_h},
    a different set per holder, each signed only by nodes shown that same set.
    Every holder refuses to unmask (too few of its neighbours signed its set) and
    forgets the round; no share of anything leaves."""
    protocol = Protocol(secagg_cfg(tmp_path))
    run_to_upload(protocol)
    nodes = sorted(protocol.contexts)
    target, holders = nodes[0], nodes[1:]
    sets = {h: (h, target, holders[(i + 1) % len(holders)]) for i, h in enumerate(holders)}
    signatures: dict[int, bytes] = {}
    for h, shown in sets.items():
        reply = ask(
            protocol, h, Stage.CONSISTENCY, ConsistencyInstruction(1, shown).to_record()
        )
        signatures[h] = signature_from_record(reply.content.config_records[SECAGG_KEY])
    revealed = []
    for h, shown in sets.items():
        # every valid signature the attacker holds on this set: only h's own
        signed = {n: signatures[n] for n in shown if sets.get(n) == shown}
        record = UnmaskInstruction(1, shown, signed).to_record()
        reply = ask(protocol, h, Stage.UNMASK, record)
        _refused(reply, "1 of this node's neighbours signed the uploader set, fewer than t")
        assert _forgot(protocol, h)
        revealed += [reply] if SECAGG_KEY in reply.content.config_records else []
    assert not revealed


def test_attack_1_honest_signatures_on_another_set_are_refused(
    tmp_path: Path, dealer: Path
) -> None:
    """Every node signed the real U; the server then shows each holder U minus one
    partner of X (to learn that partner's mask key) with the real signatures: the set
    differs from the one the holder signed, and it refuses."""
    protocol = Protocol(secagg_cfg(tmp_path))
    signatures = run_to_signed(protocol)
    nodes = sorted(protocol.contexts)
    target = nodes[0]
    for i, holder in enumerate(nodes[1:]):
        partner = nodes[1:][(i + 1) % (NODES - 1)]
        shown = tuple(n for n in nodes if n != partner)
        kept = {n: s for n, s in signatures.items() if n in shown}
        reply = ask(
            protocol, holder, Stage.UNMASK, UnmaskInstruction(1, shown, kept).to_record()
        )
        _refused(reply, "differs from the one this node signed")
        assert _forgot(protocol, holder)
    assert target in protocol.contexts


# -- attack 2: the noise floor ----------------------------------------------------------
@pytest.mark.parametrize("minimum", [NODES + 1, 10**6])
def test_attack_2_a_plan_with_m_above_the_certified_participants_is_refused(
    tmp_path: Path, dealer: Path, minimum: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """z = 1.0 with m = 10⁶ would have each client add a millionth of the noise. Every
    client refuses at key sharing, before it trains or adds any noise."""
    protocol = Protocol(secagg_cfg(tmp_path))
    protocol.plan = plan_skellam_round(protocol.dim, 1.0, 1.0, NODES, minimum, 24)
    replies: list[Message] = []
    original = SecAggRound._stage_records

    def keep(self: SecAggRound, stage: Stage, got: dict[int, Message]) -> dict:
        if stage is Stage.SHARE_KEYS:
            replies.extend(got.values())
        return original(self, stage, got)

    monkeypatch.setattr(SecAggRound, "_stage_records", keep)
    result = protocol.run()
    assert result.total is None
    assert len(replies) == NODES
    for reply in replies:
        _refused(reply, f"minimum of {minimum} uploads exceeds the {NODES} certified")
    sent = {kind for _, kind in protocol.sent}
    assert Stage.MASKED_UPDATE.message_type not in sent
    assert all(_forgot(protocol, n) for n in protocol.contexts)


def test_attack_2_an_unmask_with_fewer_than_m_signatures_is_refused(
    tmp_path: Path, dealer: Path
) -> None:
    """m = 5 of 5, t = 3: four valid signatures satisfy the neighbours' threshold
    but not m; the server's count is never asked."""
    protocol = Protocol(secagg_cfg(tmp_path, secagg_min_contributors=1.0))
    assert protocol.layout.min_contributors == NODES
    signatures = run_to_signed(protocol)
    nodes = tuple(sorted(protocol.contexts))
    four = {n: signatures[n] for n in nodes[:4]}
    reply = ask(
        protocol, FIRST, Stage.UNMASK, UnmaskInstruction(1, nodes, four).to_record()
    )
    _refused(reply, "4 certified signatures on the uploader set, fewer than the 5 needed")
    assert _forgot(protocol, FIRST)


# -- forgery ---------------------------------------------------------------------------
def test_a_signature_by_an_uncertified_key_is_rejected(
    tmp_path: Path, dealer: Path
) -> None:
    """A Sybil's signature: the right bytes for U, but made with a key no CA certified."""
    protocol = Protocol(secagg_cfg(tmp_path))
    signatures = run_to_signed(protocol)
    nodes = tuple(sorted(protocol.contexts))
    forged = dict(signatures)
    forged[nodes[-1]] = Ed25519PrivateKey.generate().sign(b"anything at all")
    reply = ask(
        protocol, FIRST, Stage.UNMASK, UnmaskInstruction(1, nodes, forged).to_record()
    )
    _refused(reply, f"node {nodes[-1]}'s signature is not on this uploader set")


def test_an_advertisement_from_another_ca_or_twice_one_identity_is_rejected(
    tmp_path: Path, dealer: Path
) -> None:
    """At key sharing: a participant certified by a CA the node does not trust (the
    server's own), or one identity advertised under two node ids (a Sybil that
    replays a real node's advertisement), and the node refuses before sharing."""
    protocol = Protocol(secagg_cfg(tmp_path))
    adverts: dict[int, Advertisement] = {}

    class StopAtShareKeys(SecAggRound):
        def _share_keys(self, view: SignedView) -> dict:
            adverts.update(view.adverts)
            raise Stop

    with pytest.raises(Stop):
        protocol.run(StopAtShareKeys)
    snapshot = {n: dict(c.state.config_records) for n, c in protocol.contexts.items()}
    rogue_dealer = deal_identities(tmp_path / "rogue", NODES)
    rogue = read_identity(rogue_dealer / partition_file(4), rogue_dealer / CA_FILE)
    last = max(adverts)
    # the same device's identity signing a second advertisement, as node 999
    twice = read_identity(dealer / partition_file(last - FIRST), dealer / CA_FILE)
    held = secagg_client.RoundSecrets.from_record(snapshot[FIRST][secagg_client.STATE_KEY])
    keys = PublicKeys(public_key(new_secret()), public_key(new_secret()))
    message = advert_message(1, 1, 999, keys, plan_digest(held.setup))
    sybil = Advertisement(
        999, keys, twice.identity.certificate, twice.identity.sign(message)
    )
    uncertified = rogue.identity.certificate
    cases = {
        "is not certified": {
            **adverts,
            last: dataclasses.replace(adverts[last], certificate=uncertified),
        },
        "is not signed by its certified identity": {
            **adverts,
            999: dataclasses.replace(adverts[last], node=999),
        },
        "advertises as nodes": {**adverts, 999: sybil},
    }
    for why, shown in cases.items():
        for n, c in protocol.contexts.items():
            c.state.config_records.clear()
            c.state.config_records.update(snapshot[n])
        record = KeysInstruction(1, shown).to_record()
        reply = ask(protocol, FIRST, Stage.SHARE_KEYS, record)
        _refused(reply, why)
        assert _forgot(protocol, FIRST)


def test_a_signature_replayed_from_an_earlier_round_is_rejected(
    tmp_path: Path, dealer: Path
) -> None:
    """Round 1's signatures on the same node set, replayed in round 2: they bind the
    signers' round-1 advertisements, so they do not verify."""
    protocol = Protocol(secagg_cfg(tmp_path))
    old = run_to_signed(protocol)
    nodes = tuple(sorted(protocol.contexts))
    protocol.server_round = 2
    new = run_to_signed(protocol)
    replayed = {**new, nodes[1]: old[nodes[1]]}
    reply = ask(
        protocol, FIRST, Stage.UNMASK, UnmaskInstruction(2, nodes, replayed).to_record()
    )
    _refused(reply, f"node {nodes[1]}'s signature is not on this uploader set")


def test_a_signature_on_another_set_is_rejected(tmp_path: Path, dealer: Path) -> None:
    """A node's signature on U' moved onto U."""
    protocol = Protocol(secagg_cfg(tmp_path))
    run_to_upload(protocol)
    nodes = tuple(sorted(protocol.contexts))
    other = nodes[:4]  # the set node nodes[1] is shown
    reply = ask(
        protocol, nodes[1], Stage.CONSISTENCY, ConsistencyInstruction(1, other).to_record()
    )
    moved = signature_from_record(reply.content.config_records[SECAGG_KEY])
    signatures = {}
    for n in nodes:
        if n == nodes[1]:
            continue
        got = ask(
            protocol, n, Stage.CONSISTENCY, ConsistencyInstruction(1, nodes).to_record()
        )
        signatures[n] = signature_from_record(got.content.config_records[SECAGG_KEY])
    signatures[nodes[1]] = moved
    reply = ask(
        protocol, FIRST, Stage.UNMASK, UnmaskInstruction(1, nodes, signatures).to_record()
    )
    _refused(reply, f"node {nodes[1]}'s signature is not on this uploader set")


def test_an_honest_round_reveals_only_for_the_signed_set(
    tmp_path: Path, dealer: Path
) -> None:
    """The control: with every signature on the one U, a holder answers once, with
    seed shares of U only."""
    protocol = Protocol(secagg_cfg(tmp_path))
    signatures = run_to_signed(protocol)
    nodes = tuple(sorted(protocol.contexts))
    reply = ask(
        protocol, FIRST, Stage.UNMASK, UnmaskInstruction(1, nodes, signatures).to_record()
    )
    shares = RevealedShares.from_record(reply.content.config_records[SECAGG_KEY])
    assert set(shares.seed_shares) == set(nodes) and not shares.key_shares
    assert _forgot(protocol, FIRST)


def test_attack_1_withholding_shares_to_isolate_one_upload_is_refused(
    tmp_path: Path, dealer: Path
) -> None:
    """With one U for everyone, the server could still isolate X by forwarding X only
    the shares of two partners (k = 5, t = 3): U = {X and the others}, those two left
    out of U so their mask keys are rebuilt, and X's pairwise masks are only theirs.
    X refuses to upload with fewer than k - t + 1 partners."""
    protocol = Protocol(secagg_cfg(tmp_path))
    target = FIRST
    withheld = (FIRST + 1, FIRST + 2)
    replies: list[Message] = []

    class Withholding(SecAggRound):
        def _masked_updates(self, shares: dict, *args: object) -> dict:
            for sender in withheld:
                sent = shares[sender]
                pairs = zip(sent.nodes, sent.ciphertexts, strict=True)
                kept = [(n, c) for n, c in pairs if n != target]
                nodes, ciphertexts = tuple(n for n, _ in kept), tuple(c for _, c in kept)
                shares[sender] = dataclasses.replace(
                    sent, nodes=nodes, ciphertexts=ciphertexts
                )
            super()._masked_updates(shares, *args)  # type: ignore[arg-type]
            replies.extend(self.result.answers)
            raise Stop

    with pytest.raises(Stop):
        protocol.run(Withholding)
    refusal = [r for r in replies if r.metadata.src_node_id == target]
    assert len(refusal) == 1
    _refused(refusal[0], "fewer than k - t + 1 = 3, so the server could unmask")
    assert _forgot(protocol, target)


def test_a_client_keeps_its_own_epsilon_against_the_server(
    tmp_path: Path, dealer: Path
) -> None:
    """After an honest round every client has composed the release of the uploads it
    verified (5 certified signatures), not a count the server reported, and reports
    that ε in its unmask reply."""
    from client.secure_aggregation.exposure import EXPOSURE_KEY
    from common.secure_aggregation.skellam_accounting import epsilon_from_rdp, round_rdp

    protocol = Protocol(secagg_cfg(tmp_path))
    result = protocol.run()
    assert result.failure is None
    expected = round_rdp(protocol.plan.release(NODES, 1.0), amplified=False)
    reported = epsilon_from_rdp(expected, 1e-3)
    assert result.client_epsilons == pytest.approx(
        dict.fromkeys(protocol.contexts, reported)
    )
    for context in protocol.contexts.values():
        held = context.state.config_records[EXPOSURE_KEY]
        assert held["rounds"] == 1
        assert epsilon_from_rdp(np.asarray(held["rdp"]), 1e-3) == pytest.approx(
            epsilon_from_rdp(expected, 1e-3)
        )


def test_a_node_without_a_certified_identity_takes_no_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No dealer (and no state-dir identity): every node refuses at setup, naming the
    reason, and nothing is ever shared."""
    from common.secure_aggregation.identity import DEALER_ENV

    monkeypatch.delenv(DEALER_ENV, raising=False)
    protocol = Protocol(secagg_cfg(tmp_path))
    result = protocol.run()
    assert result.total is None and "after key advertisement" in result.failure
    assert len(result.answers) == NODES
    for reply in result.answers:
        _refused(reply, "no usable node identity")
    assert {kind for _, kind in protocol.sent} == {Stage.SETUP.message_type}
