"""Update validation, played from the malicious client's side.

Two honest nodes train with the real ClientApp (DP-SGD on digits, noise replayable
from the seed); a third node trains honestly too, then rewrites its reply before the
server sees it. Each broken reply must come out ``rejected`` with its reason, leave
the aggregate exactly what the honest nodes give, and never reach the results as an ε.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import server.app as server_app
from common.config import RunConfig
from common.ledger.privacy_ledger import LedgerEntry, PrivacyLedger
from common.tasks.models import build_model
from common.wire.reply import TrainReport
from common.wire.reply_fields import Status
from server.app import make_strategy
from server.central_evaluation import CentralEvaluator
from server.federation_loop import RoundFailed, run_rounds
from server.results.run_folder import ResultsWriter
from server.strategies.private_fedavg import PrivateFedAvg
from server.strategies.robust import AggregateNotFinite
from simulations.launch.in_process_federation import (
    InProcessGrid,
    Tamper,
    federation,
    weights,
    with_arrays,
    with_report,
)

# The attacks rewrite float32 weights (compressed replies: test_update_compression.py).
CFG = RunConfig(
    num_rounds=3, target_epsilon=8.0, reproducible_noise=True,
    min_train_nodes=2, min_available_nodes=2, update_compression="none",
)  # fmt: skip
BAD = 102  # the malicious node (partition 2 of 3)


@pytest.fixture(autouse=True)
def _server_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)  # as the ServerApp process has


def _arrays(change: Callable[[str, np.ndarray], np.ndarray | None]) -> Tamper:
    """A tamper that maps each honest array (``None`` drops it)."""

    def tamper(reply: Message, _round: int) -> Message:
        out = {}
        for key, value in weights(reply).items():
            new = change(key, value)
            if new is not None:
                out[key] = new
        return with_arrays(reply, out)

    return tamper


def _first_only(change: Callable[[np.ndarray], np.ndarray]) -> Tamper:
    """A tamper that changes the first layer's weight only."""
    return _arrays(lambda key, v: change(v) if key == "net.1.weight" else v)


def _one_nan(v: np.ndarray) -> np.ndarray:
    out = v.copy()
    out.flat[3] = np.nan
    return out


def _extra(reply: Message, _round: int) -> Message:
    return with_arrays(reply, {**weights(reply), "backdoor": np.zeros(3, np.float32)})


def _report_change(**changes: object) -> Tamper:
    return lambda reply, _round: with_report(reply, **changes)


def _lower_epsilon(reply: Message, server_round: int) -> Message:
    """From round 2: a ledger that records the round, with more steps, at a σ that
    makes its ε lower than the one the node released before."""
    if server_round == 1:
        return reply
    honest = PrivacyLedger.from_json(str(reply.content["report"]["ledger"]))
    last = honest.entries[-1]
    forged = PrivacyLedger(
        honest.accountant, honest.delta,
        (LedgerEntry(50.0, last.sample_rate, honest.total_steps),),
        honest.rounds, honest.runs,
    )  # fmt: skip
    return with_report(reply, ledger=forged.to_json())


def _stale_ledger() -> Tamper:
    """Round 2 sends round 1's ledger again (the round is not accounted)."""
    seen: dict[int, str] = {}

    def tamper(reply: Message, server_round: int) -> Message:
        if server_round == 1:
            seen[1] = str(reply.content["report"]["ledger"])
            return reply
        return with_report(reply, ledger=seen[1])

    return tamper


def _refusal_with_an_empty_ledger(reply: Message, server_round: int) -> Message:
    """Round 2: 'budget exhausted', with a ledger that forgets round 1 (ε 0)."""
    if server_round == 1:
        return reply
    report = TrainReport.budget_exhausted(2, PrivacyLedger("rdp", CFG.delta))
    return Message(content=report.to_content(), metadata=reply.metadata)


# name -> (tamper, rounds to play, what the reason must say)
ATTACKS: dict[str, tuple[Tamper, int, str]] = {
    "nan": (_first_only(_one_nan), 1, "'net.1.weight' holds NaN or infinite values"),
    "inf": (
        _first_only(lambda v: np.full_like(v, np.inf)),
        1,
        "'net.1.weight' holds NaN or infinite values",
    ),
    "wrong shape": (
        _first_only(lambda v: np.ascontiguousarray(v[:, :32])),
        1,
        "'net.1.weight' is float32[64, 32], not float32[64, 64]",
    ),
    "wrong dtype": (
        _first_only(lambda v: v.astype(np.float64)),
        1,
        "'net.1.weight' is float64[64, 64], not float32[64, 64]",
    ),
    "extra array": (_extra, 1, "extra ['backdoor']"),
    "missing array": (
        _arrays(lambda k, v: None if k == "net.3.bias" else v),
        1,
        "missing ['net.3.bias']",
    ),
    "x1e6 norm": (
        _arrays(lambda k, v: v * np.float32(1e6)),
        1,
        "(run config key 'max-update-norm')",
    ),
    "decreasing epsilon": (_lower_epsilon, 2, "cumulative ε decreased from"),
    "stale ledger": (_stale_ledger(), 2, "does not record round 2 (its last round is 1)"),
    "refusal with a rolled-back ledger": (
        _refusal_with_an_empty_ledger,
        2,
        "budget refusal: the ledger records 0 rounds, not at least the 1 it reported",
    ),
    "missing planning-records": (
        _report_change(planning_records=None),
        1,
        "reply breaks the contract: a 'trained' reply carries exactly one weight",
    ),
    "self-reported epsilon": (
        _report_change(epsilon=0.01),
        1,
        "reply breaks the contract: a 'trained' reply may not carry epsilon",
    ),
    "malformed ledger JSON": (
        _report_change(ledger='{"format": "privfed-ledger/1", "history": [[1.0'),
        1,
        "reply breaks the contract: reply field 'ledger': ledger is not valid JSON",
    ),
    "1e9 claimed records": (
        _report_change(planning_records=10**9),
        1,
        "planning-records 1000000000 gives q = 3.2e-08",
    ),
    "non-private reply": (
        _report_change(planning_records=None, num_examples=100, train_loss=0.1),
        1,
        "a non-private reply (num-examples) in a privacy-mode 'sample' run",
    ),
    "other accountant": (
        lambda reply, _r: with_report(
            reply,
            ledger=PrivacyLedger.from_json(str(reply.content["report"]["ledger"]))
            .with_accountant("prv")
            .to_json(),
        ),
        1,
        "the ledger's accountant is 'prv', the run's is 'rdp'",
    ),
}


def _play(rounds: int, tamper: Tamper) -> tuple[ArrayRecord | None, list]:
    """``rounds`` rounds of the strategy alone (no loop): the last round's aggregate
    and outcomes."""
    contexts = federation(CFG, [0, 1, 2], 3)
    grid = InProcessGrid(contexts, {BAD: tamper})
    strategy = make_strategy(CFG)
    arrays: ArrayRecord | None = ArrayRecord(
        build_model("digits", seed=CFG.seed).state_dict()
    )
    for server_round in range(1, rounds + 1):
        assert arrays is not None
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        replies = grid.pull_messages(grid.push_messages(messages))
        arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays, strategy.last_outcomes


def _silent_in(last: int) -> Tamper:
    """The bad node answers honestly, but not in round ``last`` (the comparison run)."""
    return lambda reply, server_round: None if server_round == last else reply


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_broken_or_malicious_reply_is_rejected_with_its_reason(attack: str) -> None:
    """The bad reply is ``rejected`` naming what failed, its ε is not recorded, and the
    aggregate is exactly the honest nodes' (as if the bad node had not answered)."""
    tamper, rounds, reason = ATTACKS[attack]
    got, outcomes = _play(rounds, tamper)
    want, _ = _play(rounds, _silent_in(rounds))
    by_node = {o.node_id: o for o in outcomes}
    bad = by_node[BAD]
    assert bad.status is Status.REJECTED
    assert reason in str(bad.reason)
    assert [by_node[n].status for n in (100, 101)] == [Status.TRAINED] * 2
    assert got is not None and want is not None
    for key in want.keys():
        assert np.isfinite(got[key].numpy()).all()
        np.testing.assert_allclose(
            got[key].numpy(), want[key].numpy(), rtol=1e-5, atol=1e-7
        )


def test_honest_replies_pass_round_after_round() -> None:
    """Nothing an honest client sends is rejected (so every check above can fail only
    on the attack)."""
    arrays, outcomes = _play(3, lambda reply, _round: reply)
    assert [o.status for o in outcomes] == [Status.TRAINED] * 3
    assert arrays is not None


def _rounds(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").open()]


def _clean_loop(out: Path) -> tuple[list[dict], float]:
    """run_rounds over the two honest nodes alone: rounds.jsonl, final accuracy."""
    contexts = federation(CFG, [0, 1], 3)
    evaluator = CentralEvaluator(CFG)
    model = build_model("digits", evaluator.num_classes, seed=CFG.seed)
    result = run_rounds(
        InProcessGrid(contexts), CFG, make_strategy(CFG),
        ArrayRecord(model.state_dict()), evaluator, ResultsWriter(out, CFG),
        time.monotonic(),
    )  # fmt: skip
    return _rounds(out), evaluator(result.arrays)["accuracy"]


def _mixed(reply: Message, server_round: int) -> Message:
    """NaN in round 1, ×1e6 in round 2, 10⁹ claimed records in round 3."""
    attack = {1: "nan", 2: "x1e6 norm", 3: "1e9 claimed records"}[server_round]
    return ATTACKS[attack][0](reply, server_round)


def test_a_bad_client_over_three_rounds_leaves_accuracy_as_without_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Central accuracy with the bad client equals the run without it; every round
    records its rejection and reason, and the progress line counts it."""
    caplog.set_level(logging.INFO)
    out = tmp_path / "bad"
    cfg = _fields(CFG, results_dir=str(out))
    grid = InProcessGrid(federation(cfg, [0, 1, 2], 3), {BAD: _mixed})
    server_app.main(grid, _server_context(cfg))  # type: ignore[arg-type]
    summary = json.loads((out / "summary.json").read_text())
    rounds = _rounds(out)
    progress = [
        r.getMessage() for r in caplog.records if "[privfed] round" in r.getMessage()
    ]
    assert len(progress) == 3 and all("rejected 1 |" in line for line in progress)
    clean_rounds, clean = _clean_loop(tmp_path / "clean")
    assert clean > 0.6
    assert summary["status"] == "completed"
    assert summary["final_central"]["accuracy"] == pytest.approx(clean, abs=0.01)
    assert summary["rejected_updates"] == 3 and summary["client_failures"] == 0
    assert [r["clients_rejected"] for r in rounds] == [1, 1, 1]
    assert [r["clients_trained"] for r in rounds] == [2, 2, 2]
    for record in rounds:
        (bad,) = [c for c in record["clients"] if c["node_id"] == BAD]
        assert bad["status"] == "rejected" and bad["reason"].startswith("update rejected")
        assert bad["epsilon"] is None  # a rejected reply's ledger is not trusted
        assert bad["history"] is None and bad["ledger_released"]
    assert "'max-update-norm'" in rounds[1]["clients"][2]["reason"]
    assert "planning-records 1000000000" in rounds[2]["clients"][2]["reason"]
    assert [r["max_epsilon"] for r in rounds] == pytest.approx(
        [r["max_epsilon"] for r in clean_rounds]
    )


def test_without_validation_the_same_client_breaks_the_model() -> None:
    """The control: with no validator the NaN reply reaches the mean, and the guard on
    the aggregate stops the round before the global model turns non-finite."""
    contexts = federation(CFG, [0, 1, 2], 3)
    grid = InProcessGrid(contexts, {BAD: ATTACKS["nan"][0]})
    strategy = PrivateFedAvg(min_available_nodes=2, min_train_nodes=2)
    initial = ArrayRecord(build_model("digits", seed=CFG.seed).state_dict())
    replies = grid.pull_messages(
        grid.push_messages(strategy.configure_train(1, initial, ConfigRecord(), grid))
    )
    with pytest.raises(AggregateNotFinite, match="round 1: the aggregate's 'net.1.weight'"):
        strategy.aggregate_train(1, replies)


def test_a_round_in_which_every_update_is_rejected_ends_the_run_with_its_reason(
    tmp_path: Path,
) -> None:
    """The ServerApp's own main over the in-process nodes: RoundFailed names the round
    and the first reason, summary.json says failed, and model.pt was never written
    from a rejected round."""
    out = tmp_path / "run"
    cfg = _fields(CFG, results_dir=str(out), num_rounds=2)
    contexts = federation(cfg, [0, 1], 2)
    nan = ATTACKS["nan"][0]
    grid = InProcessGrid(contexts, {100: nan, 101: nan})
    with pytest.raises(RoundFailed) as info:
        server_app.main(grid, _server_context(cfg))  # type: ignore[arg-type]
    assert str(info.value).startswith(
        "round 1: all 2 updates were rejected; first reason: update rejected: "
        "'net.1.weight' holds NaN or infinite values"
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["stop_reason"].startswith("RoundFailed: round 1: all 2 updates were")
    assert not (out / "model.pt").exists()


def _fields(cfg: RunConfig, **changes: object) -> RunConfig:
    values = {k.replace("-", "_"): v for k, v in cfg.to_run_config().items()}
    return RunConfig(**{**values, **changes})


def _server_context(cfg: RunConfig) -> Context:
    return Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(),
        run_config=cfg.to_run_config(),
    )  # fmt: skip


def test_an_honest_budget_refusal_passes_validation() -> None:
    """A node whose budget runs out after round 1 refuses round 2 with its real ledger:
    the refusal is checked against round 1's ledger and stands."""

    def play(cfg: RunConfig) -> list:
        grid = InProcessGrid(federation(cfg, [0], 3))
        strategy = make_strategy(cfg)
        arrays = ArrayRecord(build_model("digits", seed=cfg.seed).state_dict())
        outcomes = []
        for server_round in (1, 2):
            messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
            replies = grid.pull_messages(grid.push_messages(messages))
            new, _ = strategy.aggregate_train(server_round, replies)
            arrays = new or arrays
            outcomes += strategy.last_outcomes
        return outcomes

    fixed = _fields(
        CFG, target_epsilon=0.0, noise_multiplier=1.0, min_train_nodes=1,
        min_available_nodes=1,
    )  # fmt: skip
    first = play(fixed)[0]
    assert first.status is Status.TRAINED and first.epsilon is not None
    tight = _fields(fixed, epsilon_budget=first.epsilon * 1.01)
    trained, refused = play(tight)
    assert trained.status is Status.TRAINED
    assert refused.status is Status.BUDGET_EXHAUSTED
    assert refused.epsilon == pytest.approx(first.epsilon)


def test_honest_client_level_updates_pass_and_an_unclipped_one_is_rejected(
    tmp_path: Path,
) -> None:
    """Real client-level rounds (clipped changes, the node's ledger released) pass
    round after round; the same node skipping its clipping is rejected, not re-clipped."""
    cfg = RunConfig(
        privacy_mode="client", target_epsilon=0.0, noise_multiplier=1.0,
        client_sampling_rate=1.0, client_clip_norm=0.05, num_rounds=3,
        min_available_nodes=3, min_train_nodes=1, reproducible_noise=True,
        update_compression="none",
    )  # fmt: skip
    contexts = federation(cfg, [0, 1, 2], 3)

    def unclipped(reply: Message, _round: int) -> Message:
        update = reply.content["update"]
        arrays = dict(zip(update.keys(), update.to_numpy_ndarrays(), strict=True))
        scaled = {k: v * np.float32(10) for k, v in arrays.items()}  # 10 C
        record = ArrayRecord({k: Array(v) for k, v in scaled.items()})
        content = RecordDict({**dict(reply.content.items()), "update": record})
        return Message(content=content, metadata=reply.metadata)

    grid = InProcessGrid(contexts, {BAD: lambda r, n: unclipped(r, n) if n == 3 else r})
    (tmp_path / "results").mkdir()
    strategy = make_strategy(cfg, tmp_path / "results")
    strategy.start_run(list(contexts))
    arrays = ArrayRecord(build_model("digits", seed=cfg.seed).state_dict())
    statuses = []
    for server_round in (1, 2, 3):
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        replies = grid.pull_messages(grid.push_messages(messages))
        new, _ = strategy.aggregate_train(server_round, replies)
        arrays = new or arrays
        statuses.append({o.node_id: o.status for o in strategy.last_outcomes})
    assert (
        statuses[:2]
        == [{100: Status.TRAINED, 101: Status.TRAINED, BAD: Status.TRAINED}] * 2
    )
    assert statuses[2][BAD] is Status.REJECTED
    (bad,) = [o for o in strategy.last_outcomes if o.node_id == BAD]
    assert "> this round's clip norm 0.05" in str(bad.reason)
