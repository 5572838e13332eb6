"""The white-box audit of sample-level runs: gradient canaries planted in the clipped
sum of the client that owns them, scored by the server on every round's update.

The server plays the auditor: it draws the same plan the clients draw, and scores
each canary on what it sees anyway (the owner's update). The planting test checks
the canary enters the step exactly as a clipped gradient C·e_j would.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from client.training.dp_training import _canary_places, train_private
from common.audit.gradient_canaries import gradient_canaries, white_box_applies
from common.config import RunConfig
from common.privacy.dp_sgd_plan import plan_dp_sgd_round
from common.privacy.randomness import round_generator
from common.tasks.models import build_model, count_parameters


def test_client_and_server_draw_one_plan_and_partitions_own_disjoint_canaries() -> None:
    a = gradient_canaries(3, -1, 4810, 4)
    b = gradient_canaries(3, -1, 4810, 4)
    assert np.array_equal(a.coordinates, b.coordinates)
    assert np.array_equal(a.included, b.included) and np.array_equal(a.owners, b.owners)
    assert len(a.coordinates) == 1000  # auto: min(1,000, d/2)
    mine = [set(a.included_coordinates(p).tolist()) for p in range(4)]
    assert sum(map(len, mine)) == int(a.included.sum())
    assert all(not (mine[i] & mine[j]) for i in range(4) for j in range(i + 1, 4))
    assert 0.4 < a.included.mean() < 0.6
    assert not np.array_equal(gradient_canaries(4, -1, 4810, 4).coordinates, a.coordinates)
    with pytest.raises(ValueError, match="'audit-canaries'.*at most half"):
        gradient_canaries(3, 3000, 4810, 4)


def test_the_white_box_audit_applies_to_private_direct_sample_level_runs_only() -> None:
    assert white_box_applies(RunConfig(audit="one-run", target_epsilon=8.0))
    assert not white_box_applies(RunConfig(audit="off"))
    assert not white_box_applies(RunConfig(audit="one-run", privacy_mode="none"))
    assert not white_box_applies(
        RunConfig(audit="one-run", target_epsilon=8.0, grad_sample_mode="hooks")
    )


def test_a_sampled_canary_moves_its_coordinate_as_a_clipped_gradient_would() -> None:
    """q = 1 (every record and canary in every step), σ ≈ 0, plain SGD: with the
    canaries the model moves by −lr·C/B more per step on each canary coordinate than
    without them, and nowhere else by more than the data's own drift."""
    cfg = RunConfig(target_epsilon=8.0, learning_rate=0.1, momentum=0.0, max_grad_norm=1.0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    plan = plan_dp_sgd_round(16, 16, 2)  # q = 1, 2 steps
    assert plan.sampler_rate == 1.0 and plan.steps == 2
    canaries = [5, 700, 4809]

    def delta(planted: list[int]) -> np.ndarray:
        model = build_model("digits", seed=0)
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        train_private(model, x, y, cfg, plan, 1e-9, round_generator(1), planted)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        return (after - before).numpy()

    moved = delta(canaries) - delta([])
    step = cfg.learning_rate * cfg.max_grad_norm / plan.expected_batch_size
    assert moved[canaries] == pytest.approx(-plan.steps * step, rel=0.05)
    others = np.delete(np.abs(moved), canaries)
    assert others.max() < 0.2 * step


def test_flat_coordinates_map_to_parameters_in_model_order() -> None:
    model = build_model("digits", seed=0)
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    assert _canary_places(params, [0, sizes[0] - 1, sizes[0], sum(sizes) - 1]) == [
        (0, 0), (0, sizes[0] - 1), (1, 0), (len(params) - 1, sizes[-1] - 1),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="outside the model"):
        _canary_places(params, [count_parameters(model)])


@pytest.mark.e2e
def test_a_dp_simulation_writes_the_white_box_bound(tmp_path: Path) -> None:
    """2 digits clients, 2 rounds at ε 8, the one-run audit: the real ServerApp
    scores 1,000 gradient canaries on every client's update of both rounds; the
    bound stays at most the reported ε, beside the black-box bound."""
    from tests.helpers.process_watch import run_watched

    results = tmp_path / "run"
    code, out, _ = run_watched(
        ["--clients", "2", "--rounds", "2", "--target-epsilon", "8",
         "--results-dir", str(results), "--set", 'audit="one-run"']
    )  # fmt: skip
    assert code == 0, out[-4000:]
    summary = json.loads((results / "summary.json").read_text())
    audit, white = summary["audit"], summary["audit"]["white_box"]
    assert white["canaries"] == 1000 and white["rounds_scored"] == 2
    assert white["privacy_unit"] == "record" and white["delta"] == 1e-5
    assert white["reported_epsilon"] == summary["max_epsilon"] <= 8.0 + 1e-6
    assert 0 <= white["epsilon_lower_bound"] <= summary["max_epsilon"]
    print(
        f"e2e ε 8: white-box ≥ {white['epsilon_lower_bound']:.3f}, "
        f"black-box ≥ {audit['epsilon_lower_bound']:.3f}"
    )
    assert (results / "audit-scores-white-box.png").read_bytes()[:4] == b"\x89PNG"
    assert re.search(r"white-box \(gradient canaries, every round's update\) ε ≥ \d", out)
