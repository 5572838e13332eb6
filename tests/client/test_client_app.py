"""The ClientApp's train/evaluate functions called with real Flower messages."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from flwr.app import ArrayRecord
from opacus.accountants import RDPAccountant

import client.app as client_app
import client.train_evaluate as client_training
from client.privacy.ledger_store import STATE_KEY
from common.config import RunConfig
from common.ledger.privacy_ledger import PrivacyLedger, epsilon_of_history
from common.tasks.models import build_model
from common.wire.reply import EvaluateReport, TrainReport
from common.wire.reply_fields import ARRAY_KEYS, Status
from tests.helpers.messages import evaluate_message, make_context, train_message


def _arrays(seed: int = 0) -> ArrayRecord:
    return ArrayRecord(build_model("digits", seed=seed).state_dict())


def _report(reply: object) -> TrainReport:
    return TrainReport.from_content(reply.content)  # type: ignore[attr-defined]


def _independent_epsilon(history: list[list[float]], delta: float) -> float:
    """ε recomputed by stepping a fresh Opacus RDP accountant one step at a time."""
    acc = RDPAccountant()
    for sigma, rate, steps in history:
        for _ in range(int(steps)):
            acc.step(noise_multiplier=sigma, sample_rate=rate)
    return acc.get_epsilon(delta=delta)


def test_train_reply_carries_weights_and_cumulative_privacy(digits_cfg: RunConfig) -> None:
    """Each round's reply has new weights and ε equal to an independent recomputation
    (float32 weights here; compressed replies: tests/common/test_update_compression.py)."""
    ctx = make_context(replace(digits_cfg, update_compression="none"), partition_id=3)
    arrays = _arrays()
    eps_seen = []
    for server_round in (1, 2, 3):
        reply = client_app.train(train_message(arrays, server_round), ctx)
        report = _report(reply)
        assert report.status is Status.TRAINED
        assert report.partition_id == 3
        ledger = report.ledger  # released: in a simulation the run config is the policy
        assert ledger is not None and ledger.accountant_name == "opacus-rdp"
        assert ledger.delta == digits_cfg.delta
        assert ledger.rounds == tuple(range(1, server_round + 1))
        assert report.train_loss is None and report.num_examples is None  # not DP-covered
        epsilon = ledger.epsilon()
        assert epsilon == pytest.approx(
            _independent_epsilon([list(h) for h in ledger.history()], digits_cfg.delta),
            rel=1e-9,
        )
        eps_seen.append(epsilon)
        new_state = reply.content["arrays"].to_torch_state_dict()
        old_state = arrays.to_torch_state_dict()
        assert any(not torch.equal(new_state[k], old_state[k]) for k in old_state)
    assert eps_seen[0] < eps_seen[1] < eps_seen[2]
    # σ was calibrated so that a client in every round ends at (or just under) the target.
    assert 0.99 * digits_cfg.target_epsilon <= eps_seen[-1] <= digits_cfg.target_epsilon


def test_ledger_is_stored_in_context_state(digits_cfg: RunConfig) -> None:
    """The ledger persists in context.state and a later round continues it."""
    ctx = make_context(digits_cfg)
    client_app.train(train_message(_arrays(), 1), ctx)
    stored = json.loads(str(ctx.state.config_records[STATE_KEY]["json"]))
    assert stored["rounds"] == [1]
    client_app.train(train_message(_arrays(), 2), ctx)
    stored = json.loads(str(ctx.state.config_records[STATE_KEY]["json"]))
    assert stored["rounds"] == [1, 2]
    assert len(stored["history"]) == 1  # same (σ, q): merged like Opacus does


def test_budget_refusal_happens_before_any_training_step(
    digits_cfg: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the budget the client replies 'budget-exhausted' and never trains."""
    ctx = make_context(digits_cfg)
    for server_round in (1, 2, 3):  # spends the whole target ε
        client_app.train(train_message(_arrays(), server_round), ctx)
    ledger_before = str(ctx.state.config_records[STATE_KEY]["json"])

    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("training ran although the budget is exhausted")

    monkeypatch.setattr(client_training, "train_private", forbidden)
    reply = client_app.train(train_message(_arrays(), 4), ctx)
    assert not reply.has_error()
    report = _report(reply)
    assert report.status is Status.BUDGET_EXHAUSTED
    assert not set(reply.content.array_records) & set(ARRAY_KEYS)  # no update leaves
    assert report.ledger is not None
    assert report.ledger.epsilon() <= digits_cfg.target_epsilon
    assert str(ctx.state.config_records[STATE_KEY]["json"]) == ledger_before


def test_explicit_budget_below_first_round_refuses_at_once() -> None:
    """A budget smaller than one round's ε refuses in round 1 without training."""
    cfg = RunConfig(
        num_rounds=3, target_epsilon=0.0, noise_multiplier=1.0, epsilon_budget=0.1
    )
    reply = client_app.train(train_message(_arrays(), 1), make_context(cfg))
    report = _report(reply)
    assert report.status is Status.BUDGET_EXHAUSTED
    assert report.ledger == PrivacyLedger("rdp", cfg.delta)  # nothing spent


def test_non_private_mode_trains_and_ledgers_an_unbounded_release() -> None:
    """privacy-mode='none': no ε is claimed, and the ledger records ε = ∞."""
    cfg = RunConfig(num_rounds=2, privacy_mode="none", target_epsilon=0.0)
    ctx = make_context(cfg)
    report = _report(client_app.train(train_message(_arrays(), 1), ctx))
    assert report.status is Status.TRAINED
    assert report.ledger is None  # no ε to claim
    assert report.train_loss is not None and report.train_loss > 0
    assert report.num_examples is not None and report.num_examples > 0
    stored = PrivacyLedger.from_json(str(ctx.state.config_records[STATE_KEY]["json"]))
    assert stored.released_without_dp and stored.epsilon() == float("inf")


def test_non_private_training_is_reproducible_per_seed() -> None:
    """Without DP nothing is secret: same seed, round and partition, same weights (sent
    as float32: a compressed change is stochastically rounded)."""
    cfg = RunConfig(
        num_rounds=2, privacy_mode="none", target_epsilon=0.0, update_compression="none"
    )
    first = client_app.train(train_message(_arrays(), 1), make_context(cfg))
    second = client_app.train(train_message(_arrays(), 1), make_context(cfg))
    a = first.content["arrays"].to_torch_state_dict()
    b = second.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_reports_local_metrics_when_the_run_opts_in() -> None:
    """Evaluate returns loss, accuracy and macro precision/recall/F1 on the local split."""
    cfg = RunConfig(num_rounds=3, fraction_evaluate=1.0, local_test_fraction=0.1)
    reply = client_app.evaluate(evaluate_message(_arrays(), 1), make_context(cfg))
    report = EvaluateReport.from_content(reply.content)
    assert report.status is Status.SCORED
    assert report.num_examples is not None and report.num_examples > 0
    scores = dict(report.scores)
    assert set(scores) == {"loss", "accuracy", "precision", "recall", "f1"}
    assert 0.0 <= scores["accuracy"] <= 1.0


def test_evaluate_is_refused_without_opt_in(digits_cfg: RunConfig) -> None:
    """By default no un-noised local metric leaves the client."""
    reply = client_app.evaluate(evaluate_message(_arrays(), 1), make_context(digits_cfg))
    report = EvaluateReport.from_content(reply.content)
    assert report.status is Status.POLICY_REFUSED
    assert "federated-evaluation = false" in str(report.reason)
    assert report.scores == () and report.num_examples is None


def test_missing_partition_id_is_a_clear_error(digits_cfg: RunConfig) -> None:
    """A node without partition-id fails naming the missing key."""
    ctx = make_context(digits_cfg)
    ctx.node_config = {}
    with pytest.raises(ValueError, match="partition-id"):
        client_app.train(train_message(_arrays(), 1), ctx)


def test_ledger_is_reported_under_the_runs_accountant(digits_cfg: RunConfig) -> None:
    """A ledger kept under RDP is reported under PRV over its whole history, not reset."""
    ctx = make_context(digits_cfg)
    first = _report(client_app.train(train_message(_arrays(), 1), ctx)).ledger
    ctx.run_config = {**ctx.run_config, "accountant": "prv"}
    ledger = _report(client_app.train(train_message(_arrays(), 2), ctx)).ledger
    assert first is not None and ledger is not None
    assert ledger.accountant_name == "opacus-prv"
    assert ledger.total_steps == 2 * first.total_steps
    assert ledger.epsilon() == pytest.approx(
        epsilon_of_history(ledger.history(), digits_cfg.delta, "prv")
    )
