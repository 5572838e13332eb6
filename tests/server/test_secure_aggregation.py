"""Secure aggregation, played through real ClientApps in one process.

The server's view is attacked directly: a single upload must look uniform and stay
masked with everything the server may learn about that client; a server that
calls one node "dropped" to some holders and "uploaded" to others must not get
both of its secrets; out-of-order, replayed and self-incriminating requests are
refused. Dropout follows SecAgg+, and the unmasked sum equals the plain sum of the
clients' noised, quantised vectors exactly. The nodes' identities come from a trusted
dealer, as in a simulation; the active server's attacks are
``test_secure_aggregation_attacks.py``'s.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from scipy import stats

import client.secure_aggregation.stages as secagg_client
from common.secure_aggregation.consistency import UnmaskInstruction
from common.secure_aggregation.distributed_dp import signed_integers
from common.secure_aggregation.keys import combine
from common.secure_aggregation.masks import mask, mask_nonce, unpack
from common.secure_aggregation.protocol import (
    PACKED_ARRAY,
    SECAGG_KEY,
    RevealedShares,
    Stage,
)
from common.secure_aggregation.skellam_accounting import composed_epsilon
from common.tasks.models import build_model
from common.wire.reply import TrainReport
from common.wire.reply_fields import MASKED_KEY, Status
from server.app import make_strategy
from server.secure_aggregation.round import SecAggRound
from simulations.launch.in_process_federation import InProcessGrid, delivered, federation
from tests.helpers.secure_aggregation import (
    FIRST,
    NODES,
    Protocol,
    Recorder,
    ask,
    plain_sum,
    run_to_signed,
    secagg_cfg,
    server_identity,
    use_dealer,
)


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    server_identity(monkeypatch)


@pytest.fixture(autouse=True)
def _dealer(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_dealer(tmp_path_factory.mktemp("dealer"), monkeypatch)


# -- exactness and dropout ------------------------------------------------------------
def test_unmasked_sum_is_exactly_the_sum_of_the_noised_quantised_uploads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(monkeypatch)
    protocol = Protocol(secagg_cfg(tmp_path))
    result = protocol.run()
    assert result.failure is None and len(result.contributors) == NODES
    assert np.array_equal(
        result.total, plain_sum(list(recorder.values.values()), protocol.plan)
    )


@pytest.mark.parametrize("stage", [Stage.MASKED_UPDATE, Stage.UNMASK])
def test_dropout_after_sharing_and_after_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: Stage
) -> None:
    """Lost after sharing keys (before uploading): its pairwise masks are removed with
    its rebuilt mask key and the sum holds the other four. Lost after uploading: its
    mask seed is rebuilt and its upload stays in the sum."""
    recorder = Recorder(monkeypatch)
    victim = FIRST + 2
    protocol = Protocol(secagg_cfg(tmp_path), lost={(victim, stage.message_type)})
    result = protocol.run()
    assert result.failure is None
    assert result.dropped[stage.value] == [victim]
    summed = [v for n, v in recorder.values.items() if n in result.contributors]
    if stage is Stage.MASKED_UPDATE:
        assert victim not in result.contributors and len(summed) == NODES - 1
    else:
        assert victim in result.contributors and len(summed) == NODES
    assert np.array_equal(result.total, plain_sum(summed, protocol.plan))


def test_too_few_uploads_fail_without_unmasking(tmp_path: Path) -> None:
    """Three of five lost before uploading: 2 < m = 3 uploads. The round fails with the
    reason, no unmask request is ever sent, and nothing is summed."""
    lost = {(FIRST + i, Stage.MASKED_UPDATE.message_type) for i in range(3)}
    protocol = Protocol(secagg_cfg(tmp_path), lost=lost)
    result = protocol.run()
    assert result.total is None
    assert "2 of 5 clients uploaded, fewer than the round's minimum of 3" in result.failure
    assert "nothing was unmasked" in result.failure
    assert not [s for s in protocol.sent if s[1] == Stage.UNMASK.message_type]


def test_a_node_short_of_threshold_neighbours_fails_the_round(tmp_path: Path) -> None:
    """Three of five lost at key advertisement: the others have 2 < t = 3 live
    neighbours, so their secrets could never be rebuilt; the round stops there."""
    lost = {(FIRST + i, Stage.SETUP.message_type) for i in range(3)}
    result = Protocol(secagg_cfg(tmp_path), lost=lost).run()
    assert result.total is None and "fewer than t = 3" in result.failure


# -- the server's view of one client ----------------------------------------------------
def _uniform_pvalue(values: np.ndarray, bits: int) -> float:
    top = (values >> np.uint64(bits - 4)).astype(np.int64)  # 16 bins
    return float(stats.chisquare(np.bincount(top, minlength=16)).pvalue)


def test_one_upload_is_uniform_and_stays_masked_without_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Play the server: take one client's upload and remove what the protocol gives
    the server about that client alone (its rebuilt mask seed). What is left is
    still uniform mod 2^b and is not the client's vector; the client's own vector
    before masking is far from uniform (so the test can tell)."""
    recorder = Recorder(monkeypatch)
    rebuilt: dict[tuple[int, str], bytes] = {}
    original = SecAggRound._rebuild

    def keep(self: SecAggRound, owner: int, shares: list[bytes], what: str) -> bytes:
        secret = original(self, owner, shares, what)
        rebuilt[(owner, what)] = secret
        return secret

    monkeypatch.setattr(SecAggRound, "_rebuild", keep)
    protocol = Protocol(secagg_cfg(tmp_path))
    result = protocol.run()
    plan, target = protocol.plan, FIRST + 1
    packed = result.uploads[target].content.array_records[MASKED_KEY][PACKED_ARRAY]
    upload = unpack(packed.numpy(), plan.modulus_bits, plan.padded_dim)
    assert _uniform_pvalue(upload, plan.modulus_bits) > 1e-4
    seed = rebuilt[(target, "mask seed")]
    peeled = (upload - mask(seed, plan.padded_dim, plan.modulus_bits, mask_nonce(1))) % (
        np.uint64(plan.modulus)
    )
    assert _uniform_pvalue(peeled, plan.modulus_bits) > 1e-4
    assert not np.array_equal(peeled, recorder.values[target])
    assert _uniform_pvalue(recorder.values[target], plan.modulus_bits) < 1e-10


def _ask(protocol: Protocol, node: int, instruction: UnmaskInstruction) -> Message:
    return ask(protocol, node, Stage.UNMASK, instruction.to_record())


def test_an_equivocating_server_never_gets_both_secrets_of_a_node(tmp_path: Path) -> None:
    """Tell some holders that node X dropped (to get shares of its mask key) and the
    others that it uploaded (to get shares of its mask seed): with t > k/2 every
    split leaves one of the two below t, and too few shares do not combine."""
    protocol = Protocol(secagg_cfg(tmp_path))
    signatures = run_to_signed(protocol)
    nodes = sorted(protocol.contexts)
    target, others = nodes[0], nodes[1:]
    t = protocol.layout.threshold
    snapshot = {n: RecordDict(dict(c.state.items())) for n, c in protocol.contexts.items()}
    held = secagg_client.RoundSecrets.from_record(
        snapshot[target].config_records[secagg_client.STATE_KEY]
    )
    for told_dropped in itertools.chain.from_iterable(
        itertools.combinations(others, r) for r in range(len(others) + 1)
    ):
        for n, c in protocol.contexts.items():  # every split starts from the same state
            c.state = RecordDict(dict(snapshot[n].items()))
        seeds, keys = [], []
        for holder in nodes:
            dropped = (target,) if holder in told_dropped else ()
            uploaded = tuple(n for n in nodes if n not in dropped)
            signed = {n: s for n, s in signatures.items() if n in uploaded}
            reply = _ask(protocol, holder, UnmaskInstruction(1, uploaded, signed))
            if SECAGG_KEY not in reply.content.config_records:
                continue  # refused
            shares = RevealedShares.from_record(reply.content.config_records[SECAGG_KEY])
            seeds += [shares.seed_shares[target]] if target in shares.seed_shares else []
            keys += [shares.key_shares[target]] if target in shares.key_shares else []
        assert min(len(seeds), len(keys)) < t, told_dropped
        short, secret = (
            (seeds, held.mask_seed) if len(seeds) < t else (keys, held.masking_key)
        )
        if short:
            try:
                assert combine(short) != secret
            except ValueError:
                pass  # the shares do not even combine


@pytest.mark.parametrize(
    ("leave_out", "signers", "why"),
    [
        (FIRST + 1, NODES, "differs from the one this node signed"),
        (None, 2, "fewer than t = 3"),
    ],
)
def test_a_client_refuses_unmask_requests_that_would_expose_someone(
    tmp_path: Path, leave_out: int | None, signers: int, why: str
) -> None:
    """U other than the one the holder signed, or too few signatures on it."""
    protocol = Protocol(secagg_cfg(tmp_path))
    signatures = run_to_signed(protocol)
    uploaded = tuple(n for n in sorted(protocol.contexts) if n != leave_out)
    kept = {n: signatures[n] for n in uploaded[:signers]}
    reply = _ask(protocol, FIRST, UnmaskInstruction(1, uploaded, kept))
    report = TrainReport.from_content(reply.content)
    assert report.status is Status.POLICY_REFUSED and why in str(report.reason)
    assert SECAGG_KEY not in reply.content.config_records


def test_a_client_answers_unmask_once(tmp_path: Path) -> None:
    protocol = Protocol(secagg_cfg(tmp_path))
    signatures = run_to_signed(protocol)
    nodes = tuple(sorted(protocol.contexts))
    instruction = UnmaskInstruction(1, nodes, signatures)
    first = _ask(protocol, FIRST, instruction)
    assert SECAGG_KEY in first.content.config_records
    again = TrainReport.from_content(_ask(protocol, FIRST, instruction).content)
    assert again.status is Status.POLICY_REFUSED and "no secure-aggregation round" in str(
        again.reason
    )


def test_a_threshold_of_half_the_shares_is_refused_by_the_client(tmp_path: Path) -> None:
    """t = 2 of 4 shares would let an equivocating server rebuild both secrets."""
    import client.app as client_app

    protocol = Protocol(secagg_cfg(tmp_path))
    record = ConfigRecord(
        {
            "stage": Stage.SETUP.value, "server-round": 1,
            "neighbours": [FIRST, FIRST + 1, FIRST + 2, FIRST + 3], "threshold": 2,
            "dim": protocol.dim, "clip-norm": 1.0, "coordinate-clip": 0.05,
            "scale": 1000.0, "modulus-bits": 16, "noise-multiplier": 1.0,
            "min-contributors": 2, "rotation-seed": bytes(32),
        }
    )  # fmt: skip
    msg = delivered(RecordDict({SECAGG_KEY: record}), Stage.SETUP.message_type, FIRST)
    report = TrainReport.from_content(client_app.app(msg, protocol.contexts[FIRST]).content)
    assert report.status is Status.POLICY_REFUSED
    assert "more than half" in str(report.reason)


def test_a_plain_train_message_never_gets_the_update_in_the_clear(tmp_path: Path) -> None:
    """The server asks a secure-aggregation client for an ordinary client-level
    update: the client refuses and sends no arrays."""
    import client.app as client_app

    protocol = Protocol(secagg_cfg(tmp_path))
    msg = delivered(protocol.content(FIRST), "train", FIRST)
    reply = client_app.app(msg, protocol.contexts[FIRST])
    report = TrainReport.from_content(reply.content)
    assert report.status is Status.POLICY_REFUSED and "secure-aggregation" in report.reason
    assert not reply.content.array_records


def test_a_stage_out_of_order_is_refused(tmp_path: Path) -> None:
    """A masked-update request before keys were shared: no training, no upload."""
    import client.app as client_app

    protocol = Protocol(secagg_cfg(tmp_path))
    content = protocol.content(FIRST)
    content[SECAGG_KEY] = ConfigRecord(
        {"stage": Stage.MASKED_UPDATE.value, "server-round": 1, "nodes": [],
         "ciphertexts": []}
    )  # fmt: skip
    msg = delivered(content, Stage.MASKED_UPDATE.message_type, FIRST)
    report = TrainReport.from_content(client_app.app(msg, protocol.contexts[FIRST]).content)
    assert report.status is Status.POLICY_REFUSED and "no secure-aggregation round" in str(
        report.reason
    )


# -- the strategy: ledger, ε, the model -------------------------------------------------
def test_rounds_are_ledgered_with_the_noise_actually_summed(tmp_path: Path) -> None:
    """Two rounds; in the second a client is lost after sharing. Each ledger entry's
    variance is (uploads summed)·V/m, its ε is the Skellam accountant's on the
    recorded releases, and the model moved."""
    cfg = secagg_cfg(tmp_path, client_sampling_rate=1.0)
    contexts = federation(cfg, range(NODES), NODES, first_node=FIRST)
    lost_round = {"now": 1}
    grid = InProcessGrid(
        contexts,
        lost=lambda node, kind: (
            lost_round["now"] == 2
            and (node, kind) == (FIRST + 3, Stage.MASKED_UPDATE.message_type)
        ),
    )
    out = Path(cfg.results_dir)
    out.mkdir(parents=True)
    strategy = make_strategy(cfg, out, 1)
    strategy.start_run(grid.get_node_ids())
    arrays = ArrayRecord(build_model(cfg.task, seed=0).state_dict())
    for server_round in (1, 2):
        lost_round["now"] = server_round
        step = strategy.train_round(server_round, arrays, grid, 0.3)  # in process: at once
        assert step.arrays is not None
        moved = step.arrays
    ledger = json.loads((out / "federation-ledger.json").read_text())
    rounds = ledger["rounds"]
    assert [r["contributors"] for r in rounds] == [5, 4]
    share = rounds[0]["variance"] / 5
    assert rounds[1]["variance"] == pytest.approx(4 * share)
    from common.secure_aggregation.skellam_accounting import SkellamRound

    releases = [SkellamRound.from_dict(r) for r in rounds]
    assert ledger["epsilon"] == pytest.approx(composed_epsilon(releases, cfg.delta))
    assert ledger["accountant"] == "skellam-rdp" and ledger["delta"] == cfg.delta
    assert rounds[1]["epsilon"] > rounds[0]["epsilon"]
    before = arrays.to_numpy_ndarrays()
    after = moved.to_numpy_ndarrays()
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    # q = 1: against the server the same rounds, no amplification either way
    assert ledger["epsilon_against_server"] == pytest.approx(ledger["epsilon"])


def test_zero_updates_unmask_to_the_noise_of_the_survivors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every client's change is zero and one is lost after sharing: the unmasked sum
    is pure noise with the variance of 4 shares, 4·V/m, as the ledger will record."""
    import dataclasses

    import client.train_evaluate as client_training

    honest = client_training._clipped_change

    def zero_change(*args: Any) -> Any:
        keys, clipped, ledger = honest(*args)
        zeros = tuple(np.zeros_like(a) for a in clipped.arrays)
        return keys, dataclasses.replace(clipped, arrays=zeros), ledger

    monkeypatch.setattr(client_training, "_clipped_change", zero_change)
    protocol = Protocol(
        secagg_cfg(tmp_path), lost={(FIRST, Stage.MASKED_UPDATE.message_type)}
    )
    result = protocol.run()
    plan = protocol.plan
    noise = signed_integers(result.total, plan.modulus_bits).astype(np.float64)
    expected = 4 * plan.share_variance
    dof = plan.padded_dim - 1
    low, high = stats.chi2.ppf([1e-4, 1 - 1e-4], dof) / dof
    assert low < noise.var(ddof=1) / expected < high
    assert plan.release(4, 1.0).variance == pytest.approx(expected)


def test_resume_continues_the_ledger_and_charges_the_round_in_flight(
    tmp_path: Path,
) -> None:
    """A checkpoint after round 1; the server died after ledgering round 2. The
    resumed strategy keeps both rounds (ε never goes back) and charges round 2 to
    every client's exposure to the server, since who uploaded is not on disk."""
    cfg = secagg_cfg(tmp_path)
    contexts = federation(cfg, range(NODES), NODES, first_node=FIRST)
    grid = InProcessGrid(contexts)
    out = Path(cfg.results_dir)
    out.mkdir(parents=True)
    arrays = ArrayRecord(build_model(cfg.task, seed=0).state_dict())
    first = make_strategy(cfg, out, 1)
    first.start_run(grid.get_node_ids())
    first.train_round(1, arrays, grid, 0.3)
    saved = first.state_dict()
    first.train_round(2, arrays, grid, 0.3)  # ledgered, then the server "dies"
    epsilon_before = first.distributed.epsilon()

    resumed = make_strategy(cfg, out, 2)
    resumed.start_run(grid.get_node_ids())
    resumed.load_state_dict(saved)
    assert resumed.distributed.rounds_recorded == 2
    assert resumed.distributed.epsilon() == pytest.approx(epsilon_before)
    assert resumed.epsilon_against_server[FIRST] == pytest.approx(
        first.epsilon_against_server[FIRST]
    )
    (out / "federation-ledger.json").write_text(json.dumps({"rounds": []}))
    rolled_back = make_strategy(cfg, out, 3)
    rolled_back.start_run(grid.get_node_ids())
    with pytest.raises(ValueError, match="does not extend"):
        rolled_back.load_state_dict(saved)
