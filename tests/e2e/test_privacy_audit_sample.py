"""The sample-level one-run audit, from the auditor's side.

The federation runs in-process with the real ClientApp (its DP-SGD, its shards with
the canaries planted from the seed); the test plays the server: it averages the
replies and audits the final model with the server's own audit code.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

import client.app as client_app
import client.train_evaluate as client_training
from client.data.local_data import load_client_shard
from client.node_settings import NodeSettings
from common.audit.canaries import canary_plan, inserts_canary_records
from common.config import ConfigError, RunConfig
from common.data.datasets import load_dataset
from common.privacy.randomness import reproducible_seed
from common.tasks.models import build_model
from common.wire.reply import TrainReport
from common.wire.reply_fields import Status
from server.audit.privacy_audit import (
    ONE_RUN_METHOD,
    OneRunBound,
    audit_log_line,
    audit_sample_level,
    check_canaries,
    run_sample_level_audit,
)
from tests.helpers.device import device_context as _device_context
from tests.helpers.device import digits_npz as _digits_npz
from tests.helpers.device import write_policy
from tests.helpers.messages import make_context, train_message
from tests.helpers.server_attacks import replayed_noise as _replayed_noise

CLIENTS = 2
# Strong canaries: 500 mislabelled digits (a third of the pool), 10 local epochs a round.
AUDIT = {"audit": "one-run", "audit_canaries": 500, "local_epochs": 10}


def _federate(
    cfg: RunConfig, replay: pytest.MonkeyPatch | None = None
) -> tuple[dict[str, torch.Tensor], float | None]:
    """Run ``cfg`` in-process; average the replies (equal weights) each round.

    With ``replay`` the server replays each client's reproducible noise, removes it
    from the update (plain SGD: the update is lr/B · Σ (clipped sum + noise)) and sends
    the de-noised average on. Returns the final weights and the largest reported ε.
    The clients send float32 weights (``update-compression = "none"``), averaged here.
    """
    cfg = dataclasses.replace(cfg, update_compression="none")
    state = build_model(cfg.task, seed=cfg.seed).state_dict()
    contexts = [make_context(cfg, p, CLIENTS, node_id=p + 1) for p in range(CLIENTS)]
    epsilons: list[float] = []
    for rnd in range(1, cfg.num_rounds + 1):
        arrays = ArrayRecord(state)
        updates = []
        for pid, ctx in enumerate(contexts):
            reply = client_app.train(train_message(arrays, rnd, pid + 1), ctx)
            report = TrainReport.from_content(reply.content)
            assert report.status is Status.TRAINED, report
            after = reply.content["arrays"].to_torch_state_dict()
            if report.ledger is not None:
                epsilons.append(report.ledger.epsilon())
            if replay is not None:
                n = len(load_client_shard(cfg, NodeSettings(pid, CLIENTS)).x_train)
                sigma = report.ledger.entries[-1].noise_multiplier
                guess = reproducible_seed(cfg.seed, pid, rnd)
                noise, batch = _replayed_noise(cfg, n, sigma, guess, replay)
                after = {
                    k: v + cfg.learning_rate / batch * z
                    for (k, v), z in zip(after.items(), noise, strict=True)
                }
            updates.append(after)
        state = {k: sum(u[k] for u in updates) / CLIENTS for k in state}
    return state, (max(epsilons) if epsilons else None)


def test_canaries_are_planted_as_planned() -> None:
    """Included canaries train once, mislabelled; no canary trains under its true label."""
    cfg = RunConfig(privacy_mode="none", **AUDIT)
    data = load_dataset("digits", "", cfg.seed)
    plan = canary_plan(cfg.seed, 500, data.y_train, data.num_classes)
    again = canary_plan(cfg.seed, 500, data.y_train, data.num_classes)  # server's copy
    assert np.array_equal(plan.indices, again.indices)
    assert np.array_equal(plan.included, again.included)
    assert 200 < plan.included.sum() < 300
    trained: list[tuple[bytes, int]] = []
    for pid in range(CLIENTS):
        shard = load_client_shard(cfg, NodeSettings(pid, CLIENTS))
        trained += [
            (x.numpy().tobytes(), int(y))
            for x, y in zip(shard.x_train, shard.y_train, strict=True)
        ]
    trained_set = set(trained)
    x = data.x_train
    for i, idx in enumerate(plan.indices):
        key = x[idx].tobytes()
        assert (key, int(plan.true_labels[i])) not in trained_set
        assert ((key, int(plan.labels[i])) in trained_set) == bool(plan.included[i])
    n_clean = len(data.y_train) - 500
    assert len(trained) == n_clean + int(plan.included.sum())


def test_too_many_canaries_names_the_key() -> None:
    y = np.arange(100) % 10
    with pytest.raises(ConfigError, match="run config key 'audit-canaries': must be <= 50"):
        canary_plan(0, 51, y, 10)
    # the ServerApp checks it before round 1: digits has 1,437 training records
    with pytest.raises(ConfigError, match="'audit-canaries': must be <= 718 .* got 1000"):
        check_canaries(RunConfig(audit="one-run", audit_canaries=1000))
    check_canaries(RunConfig(audit="one-run", audit_canaries=718))
    check_canaries(RunConfig(audit="one-run"))  # the default (auto) fits every task


def test_non_private_run_is_caught(tmp_path: Path) -> None:
    cfg = RunConfig(privacy_mode="none", num_rounds=5, **AUDIT)
    state, reported = _federate(cfg)
    assert reported is None
    block, line = run_sample_level_audit(cfg, state, reported, tmp_path)
    print(f"non-private audited ε lower bound: {block['epsilon_lower_bound']:.3f}")
    assert block["epsilon_lower_bound"] >= 1.0
    assert line.startswith("audited ε lower bound ")
    assert "(95%, one-run, 500 canaries) vs reported ε ∞" in line
    assert (tmp_path / block["plot"]).stat().st_size > 1000
    assert json.loads(json.dumps(block))["inclusion_probability"] == 0.5


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_dp_runs_stay_below_the_reported_epsilon(epsilon: float, seed: int) -> None:
    cfg = RunConfig(target_epsilon=epsilon, num_rounds=5, seed=seed, **AUDIT)
    state, reported = _federate(cfg)
    assert reported is not None and reported <= epsilon + 1e-6
    bound = audit_sample_level(cfg, state).bound
    print(f"ε {epsilon}, seed {seed}: audited {bound.epsilon_lower_bound:.3f}")
    assert bound.epsilon_lower_bound <= reported


def test_removed_noise_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """reproducible-noise = true: the server replays each client's noise, removes it
    and sends the de-noised model on; auditing that model proves more than the
    reported ε. One full-batch step per round (q = 1), so no noisy step happens where
    the server cannot see it; the same run without the replay stays below ε."""
    cfg = RunConfig(
        target_epsilon=1.0, num_rounds=300, local_epochs=1, batch_size=4096,
        learning_rate=10.0, reproducible_noise=True, seed=0,
        audit="one-run", audit_canaries=500,
    )  # fmt: skip
    state, reported = _federate(cfg, replay=monkeypatch)
    assert reported is not None and reported <= 1.0
    caught = audit_sample_level(cfg, state).bound.epsilon_lower_bound
    state, _ = _federate(cfg)
    honest = audit_sample_level(cfg, state).bound.epsilon_lower_bound
    print(f"de-noised: audited {caught:.3f}, noisy: {honest:.3f}, reported {reported:.3f}")
    assert honest <= reported < caught


def test_the_log_line_names_what_was_reported() -> None:
    bound = OneRunBound(ONE_RUN_METHOD, 500, 80, 80, 0.95, 1e-5, 2.713)
    assert audit_log_line(bound, 7.996, private=True) == (
        "audited ε lower bound 2.713 (95%, one-run, 500 canaries) vs reported ε 7.996"
    )
    assert audit_log_line(bound, None, private=False).endswith("ε ∞ (non-private)")
    assert "not released" in audit_log_line(bound, None, private=True)


def test_audit_applies_to_record_modes_only() -> None:
    assert inserts_canary_records(RunConfig(audit="one-run"))
    assert inserts_canary_records(RunConfig(audit="one-run", privacy_mode="none"))
    assert not inserts_canary_records(RunConfig())
    client_level = RunConfig(audit="one-run", privacy_mode="client", target_epsilon=3.0)
    assert not inserts_canary_records(client_level)


def test_a_deployed_node_refuses_the_audit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("trained in an audit run on a device")

    monkeypatch.setattr(client_training, "train_private", forbidden)
    data = _digits_npz(tmp_path / "d.npz", 300)
    cfg = RunConfig(num_rounds=3, target_epsilon=8.0, audit="one-run", audit_canaries=10)
    initial = ArrayRecord(build_model("digits", seed=0).state_dict())
    ctx = _device_context(cfg, data, write_policy(tmp_path / "state"))
    report = TrainReport.from_content(
        client_app.train(train_message(initial, 1), ctx).content
    )
    assert report.status is Status.POLICY_REFUSED
    assert "run config key 'audit'" in str(report.reason)


@pytest.mark.e2e
def test_a_flower_simulation_writes_the_audit(tmp_path: Path) -> None:
    """2 digits clients, 2 rounds, non-private, audit-canaries left at its default
    (auto: 718, half of digits' 1,437 records): summary.json's audit block, the plot
    and the final log line come from the real ServerApp."""
    from tests.helpers.process_watch import run_watched

    results = tmp_path / "run"
    code, out, _ = run_watched(
        ["--clients", "2", "--rounds", "2", "--privacy-mode", "none",
         "--results-dir", str(results), "--set", "local-epochs=10",
         "--set", 'audit="one-run"']
    )  # fmt: skip
    assert code == 0, out[-4000:]
    audit = json.loads((results / "summary.json").read_text())["audit"]
    assert audit["method"] == "steinke-nasr-jagielski-2023 one-run"
    assert audit["canaries"] == 718 and audit["inclusion_probability"] == 0.5
    assert audit["confidence"] == 0.95 and audit["delta"] == 1e-5
    assert 0 < audit["guesses"] <= 718 and audit["reported_epsilon"] is None
    print(f"e2e non-private audited ε lower bound: {audit['epsilon_lower_bound']:.3f}")
    assert audit["epsilon_lower_bound"] > 0
    assert (results / "audit-scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(
        r"audited ε lower bound \d+\.\d{3} \(95%, one-run, 718 canaries\) "
        r"vs reported ε ∞ \(non-private\)",
        out,
    )


def test_the_audit_script_options_and_outputs(tmp_path: Path) -> None:
    """simulations.audit_sweep: audit keys reach every run; table and plot from its rows."""
    from simulations import audit_sweep as script

    args, canaries = script.parse_args(["--canaries", "300", "--epsilons", "1"])
    assert canaries == 300 and args.partitioners == ["iid"]
    assert {'audit="one-run"', "audit-canaries=300"} <= set(args.set)
    common = {"seed": 0, "accountant": "opacus-rdp", "delta": 1e-5, "run_seconds": 9.0}
    audited = {"method": ONE_RUN_METHOD, "canaries": 300, "confidence": 0.95}
    rows = [
        script.AuditRow(
            name="eps1", target_epsilon=1.0, status="completed", reported_epsilon=0.998,
            audited_lower_bound=0.0, guesses=10, correct=5, accuracy=0.5,
            **common, **audited,
        ),
        script.AuditRow(
            name="nonprivate", target_epsilon=None, status="completed",
            reported_epsilon=None, audited_lower_bound=2.713, guesses=80, correct=80,
            accuracy=0.9, **common, **audited,
        ),
        script.AuditRow(
            name="client-eps8", target_epsilon=8.0, status="completed",
            reported_epsilon=7.992, audited_lower_bound=1.18, guesses=160, correct=136,
            accuracy=0.76, white_box_lower_bound=1.544, **common, **audited,
        ),
    ]  # fmt: skip
    script.write_table(rows, tmp_path)
    table = (tmp_path / "audit-table.md").read_text()
    assert "| 1 | 0 | 0.998 (opacus-rdp, δ=1e-05) | 0.000 (95%) | — |" in table
    assert "| non-private | 0 | ∞ (non-private) | 2.713 (95%) | — |" in table
    assert "| 7.992 (opacus-rdp, δ=1e-05) | 1.180 (95%) | 1.544 |" in table
    assert (tmp_path / "audit-table.csv").read_text().count("\n") == 4
    png = script.plot(rows, tmp_path).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
