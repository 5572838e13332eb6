"""Robust aggregation: 2 of 10 clients send large adversarial updates (sample-level DP).

Honest updates are real DP-SGD rounds of client.app on digits; the noise is replayable
from the seed (``reproducible-noise``), so every run sees the same honest updates and
the comparison is between rules, not between noise draws.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum
from flwr.supercore.task_identity import TaskIdentity

from common.config import ConfigError, RunConfig
from common.tasks.models import build_model
from server.app import make_strategy
from server.central_evaluation import CentralEvaluator
from server.federation_loop import run_rounds
from server.results.run_folder import ResultsWriter
from simulations.launch.in_process_federation import (
    InProcessGrid,
    colluding_push,
    federation,
    weights,
)

ROUNDS = 5
ATTACK_NORM = 200.0  # far above an honest update (~6 here), within max-update-norm


@pytest.fixture(autouse=True)
def _server_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)  # as the ServerApp process has


def _accuracy(tmp_path: Path, aggregation: str, attacked: bool) -> tuple[float, int]:
    """Final central accuracy after ROUNDS rounds over 10 clients; rejected replies."""
    cfg = RunConfig(
        num_rounds=ROUNDS, target_epsilon=8.0, reproducible_noise=True,
        aggregation=aggregation, krum_byzantine=2,
        min_train_nodes=10, min_available_nodes=10,
        update_compression="none",  # the attackers rewrite float32 weights
    )  # fmt: skip
    contexts = federation(cfg, range(10), 10)
    attack = colluding_push(ATTACK_NORM)  # the two attackers push the same way
    tamper = {100: attack, 101: attack} if attacked else {}
    evaluator = CentralEvaluator(cfg)
    initial = build_model(cfg.task, evaluator.num_classes, seed=cfg.seed)
    out = tmp_path / f"{aggregation}-{attacked}"
    result = run_rounds(
        InProcessGrid(contexts, tamper), cfg, make_strategy(cfg),
        ArrayRecord(initial.state_dict()), evaluator, ResultsWriter(out, cfg),
        time.monotonic(),
    )  # fmt: skip
    assert result.rounds_completed == ROUNDS
    return evaluator(result.arrays)["accuracy"], result.state.rejections


def test_median_and_krum_resist_two_attackers_where_fedavg_does_not(
    tmp_path: Path,
) -> None:
    """The attack passes validation (its norm is within max-update-norm) and breaks
    the mean; median and Krum stay near the clean run."""
    clean, _ = _accuracy(tmp_path, "fedavg", attacked=False)
    mean, rejected = _accuracy(tmp_path, "fedavg", attacked=True)
    median, _ = _accuracy(tmp_path, "median", attacked=True)
    krum, _ = _accuracy(tmp_path, "krum", attacked=True)
    trimmed, _ = _accuracy(tmp_path, "trimmed-mean", attacked=True)
    assert clean > 0.75
    assert rejected == 0  # the robust rule, not validation, has to stop this attack
    assert mean < 0.3
    assert median > clean - 0.1
    assert trimmed > clean - 0.1
    # Krum keeps one client's update (one tenth of the data, its own noise): it pays
    # for that even without an attack (0.74 against 0.87 here), not for the attack.
    assert krum > clean - 0.2


def test_robust_rule_leaves_the_replies_intact_and_keeps_server_momentum(
    tmp_path: Path,
) -> None:
    """Flower's FedMedian pops arrays from the messages it reads: the strategy hands it
    copies, so every reply is still whole afterwards; the server step follows."""
    cfg = RunConfig(
        num_rounds=1, target_epsilon=8.0, reproducible_noise=True, aggregation="median",
        server_learning_rate=0.5, min_train_nodes=3, min_available_nodes=3,
        update_compression="none",  # the replies' float32 weights are compared below
    )  # fmt: skip
    contexts = federation(cfg, range(3), 3)
    grid = InProcessGrid(contexts)
    strategy = make_strategy(cfg)
    initial = ArrayRecord(build_model("digits", seed=cfg.seed).state_dict())
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), grid))
    replies = grid.pull_messages(grid.push_messages(messages))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    for reply in replies:
        assert list(reply.content["arrays"].keys()) == list(initial.keys())
    for key in initial.keys():
        stack = np.stack([weights(r)[key] for r in replies])
        median = np.median(stack, axis=0)
        start = initial[key].numpy()
        expected = start - 0.5 * (start - median)  # x ← x − η·(x − median)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean", "krum"])
def test_client_level_dp_refuses_robust_rules_naming_both_keys(aggregation: str) -> None:
    """Client-level accounting assumes the noised mean of clipped updates."""
    with pytest.raises(ConfigError) as info:
        RunConfig(privacy_mode="client", aggregation=aggregation)
    message = str(info.value)
    assert "'aggregation'" in message and "'privacy-mode'" in message
    assert repr(aggregation) in message


@pytest.mark.parametrize("mode", ["sample", "none"])
@pytest.mark.parametrize("aggregation", ["fedavg", "median", "trimmed-mean", "krum"])
def test_sample_level_and_non_private_runs_allow_every_rule(
    mode: str, aggregation: str
) -> None:
    """Any rule is post-processing of the released (sample-level DP) updates; the
    strategy gets Flower's rule with the run's parameters."""
    cfg = RunConfig(
        privacy_mode=mode, aggregation=aggregation, target_epsilon=8.0,
        trim_fraction=0.3, krum_byzantine=3,
    )  # fmt: skip
    rule = make_strategy(cfg).rule
    if aggregation == "fedavg":
        assert rule is None
    elif aggregation == "median":
        assert isinstance(rule, FedMedian)
    elif aggregation == "trimmed-mean":
        assert isinstance(rule, FedTrimmedAvg) and rule.beta == 0.3
    else:
        assert isinstance(rule, Krum) and rule.num_malicious_nodes == 3
