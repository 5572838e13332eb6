"""The ClientApp's train/evaluate functions called with real Flower messages."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord
from opacus.accountants import RDPAccountant

import client.app as client_app
from client.ledger_store import STATE_KEY
from common.config import RunConfig
from common.models import build_model
from common.privacy_ledger import epsilon_of_history
from common.protocol import STATUS_BUDGET_EXHAUSTED, STATUS_TRAINED
from tests.conftest import evaluate_message, make_context, train_message


def _arrays(seed: int = 0) -> ArrayRecord:
    return ArrayRecord(build_model("digits", seed=seed).state_dict())


def _independent_epsilon(history: list[list[float]], delta: float) -> float:
    """ε recomputed by stepping a fresh Opacus RDP accountant one step at a time."""
    acc = RDPAccountant()
    for sigma, rate, steps in history:
        for _ in range(int(steps)):
            acc.step(noise_multiplier=sigma, sample_rate=rate)
    return acc.get_epsilon(delta=delta)


def test_train_reply_carries_weights_and_cumulative_privacy(digits_cfg: RunConfig) -> None:
    """Each round's reply has new weights and ε equal to an independent recomputation."""
    ctx = make_context(digits_cfg, partition_id=3)
    arrays = _arrays()
    eps_seen = []
    for server_round in (1, 2, 3):
        reply = client_app.train(train_message(arrays, server_round), ctx)
        metrics = reply.content["metrics"]
        privacy = reply.content["privacy"]
        assert privacy["status"] == STATUS_TRAINED
        assert privacy["accountant"] == "opacus-rdp"
        assert metrics["partition-id"] == 3
        assert metrics["delta"] == digits_cfg.delta
        assert metrics["rounds-trained"] == server_round
        assert metrics["steps-total"] == server_round * metrics["steps-round"]
        assert "train-loss" not in metrics  # a statistic of private data DP does not cover
        history = json.loads(str(privacy["ledger"]))["history"]
        assert metrics["epsilon"] == pytest.approx(
            _independent_epsilon(history, digits_cfg.delta), rel=1e-9
        )
        eps_seen.append(metrics["epsilon"])
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

    monkeypatch.setattr(client_app, "train_private", forbidden)
    reply = client_app.train(train_message(_arrays(), 4), ctx)
    assert not reply.has_error()
    assert reply.content["privacy"]["status"] == STATUS_BUDGET_EXHAUSTED
    assert "arrays" not in reply.content.array_records  # no update leaves the client
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 0
    assert metrics["epsilon"] <= digits_cfg.target_epsilon < metrics["epsilon-would-be"]
    assert str(ctx.state.config_records[STATE_KEY]["json"]) == ledger_before


def test_explicit_budget_below_first_round_refuses_at_once() -> None:
    """A budget smaller than one round's ε refuses in round 1 without training."""
    cfg = RunConfig(
        num_rounds=3, target_epsilon=0.0, noise_multiplier=1.0, epsilon_budget=0.1
    )
    reply = client_app.train(train_message(_arrays(), 1), make_context(cfg))
    assert reply.content["privacy"]["status"] == STATUS_BUDGET_EXHAUSTED
    assert reply.content["metrics"]["epsilon"] == 0.0
    assert reply.content["metrics"]["rounds-trained"] == 0


def test_non_private_mode_trains_without_privacy_metrics() -> None:
    """privacy-mode='none' is the non-private reference: no ε is claimed."""
    cfg = RunConfig(num_rounds=2, privacy_mode="none", target_epsilon=0.0)
    reply = client_app.train(train_message(_arrays(), 1), make_context(cfg))
    assert reply.content["privacy"]["status"] == STATUS_TRAINED
    assert reply.content["privacy"]["accountant"] == "none"
    assert "epsilon" not in reply.content["metrics"]
    assert reply.content["metrics"]["train-loss"] > 0  # non-private: nothing to protect


def test_training_is_reproducible_per_seed(digits_cfg: RunConfig) -> None:
    """Same seed, round and partition give identical weights."""
    first = client_app.train(train_message(_arrays(), 1), make_context(digits_cfg))
    second = client_app.train(train_message(_arrays(), 1), make_context(digits_cfg))
    a = first.content["arrays"].to_torch_state_dict()
    b = second.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_reports_local_metrics(digits_cfg: RunConfig) -> None:
    """Evaluate returns loss, accuracy and macro precision/recall/F1 on the local split."""
    reply = client_app.evaluate(evaluate_message(_arrays(), 1), make_context(digits_cfg))
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0
    for key in ("eval-loss", "eval-accuracy", "eval-precision", "eval-recall", "eval-f1"):
        assert key in metrics
    assert 0.0 <= metrics["eval-accuracy"] <= 1.0


def test_missing_partition_id_is_a_clear_error(digits_cfg: RunConfig) -> None:
    """A node without partition-id fails naming the missing key."""
    ctx = make_context(digits_cfg)
    ctx.node_config = {}
    with pytest.raises(ValueError, match="partition-id"):
        client_app.train(train_message(_arrays(), 1), ctx)


def test_ledger_is_reported_under_the_runs_accountant(digits_cfg: RunConfig) -> None:
    """A ledger kept under RDP is reported under PRV over its whole history, not reset."""
    ctx = make_context(digits_cfg)
    client_app.train(train_message(_arrays(), 1), ctx)
    ctx.run_config = {**ctx.run_config, "accountant": "prv"}
    reply = client_app.train(train_message(_arrays(), 2), ctx)
    assert reply.content["privacy"]["accountant"] == "opacus-prv"
    history = json.loads(str(reply.content["privacy"]["ledger"]))["history"]
    assert (
        sum(steps for _, _, steps in history) == 2 * reply.content["metrics"]["steps-round"]
    )
    assert reply.content["metrics"]["epsilon"] == pytest.approx(
        epsilon_of_history([tuple(h) for h in history], digits_cfg.delta, "prv")
    )
