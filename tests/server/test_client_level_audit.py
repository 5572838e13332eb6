"""The client-level one-run audit (issue 11): canary clients, the estimate, the bound.

In process: ClientLevelFedAvg is driven directly with synthetic honest client
updates on a small model (no Flower processes). The attacker's side: the audit must
see a leak when the test plays the server of a ``reproducible-noise`` run and
removes the noise, must stay below the ledger's ε on the real (noised) model, and
the estimator is checked against dp-accounting's PLD and against numerical
integration of the hockey-stick divergence.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.supercore.task_identity import TaskIdentity
from scipy import integrate, stats

from common.config import RunConfig
from common.privacy.client_level_plan import ClientLevelSettings
from common.privacy.randomness import gaussian_noise, reproducible_seed, round_generator
from common.privacy.update_clipping import clip_update
from common.wire.reply import TrainReport
from server.app import make_strategy
from server.audit.canary_clients import CanaryClients, canary_audit_line
from server.audit.one_shot_estimate import epsilon_of_gaussians, one_shot_estimate
from server.audit.privacy_audit import one_run_lower_bound
from server.strategies.client_level import SERVER_PARTITION, ClientLevelFedAvg
from server.strategies.client_level_dp import ClientLevelAggregator
from tests.helpers.messages import make_message

DELTA = 1e-5
N_CLIENTS = 50
Q = 0.5
# z for q ½ at δ 1e-5 (common.privacy.dp_sgd_plan.calibrate_gaussian_noise_multiplier,
# constant here because calibration takes ~15 s); the tests check the ledger's ε they give.
Z_EPS1_5_ROUNDS = 4.9609375
Z_EPS8_5_ROUNDS = 1.0205078125
Z_EPS2_10_ROUNDS = 3.720703125
MODEL = {"w": (40, 100), "b": (100,)}  # d = 4,100 parameters


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Server-side messages need the task identity a ServerApp process has."""
    for key, value in {"_run_id": 7, "_node_id": 1, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, key, value)


# -- helpers ------------------------------------------------------------------------
def _initial() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord(
        {k: Array(rng.normal(size=s).astype(np.float32)) for k, s in MODEL.items()}
    )


class _Nodes:
    def __init__(self, ids: range) -> None:
        self.ids = list(ids)

    def get_node_ids(self) -> list[int]:
        return self.ids


def _strategy(tmp_path: Path, z: float, rounds: int, **overrides: Any) -> ClientLevelFedAvg:
    values: dict[str, Any] = {
        "privacy_mode": "client",
        "target_epsilon": 0.0,
        "noise_multiplier": z,
        "client_sampling_rate": Q,
        "client_clip_norm": 1.0,
        "num_rounds": rounds,
        "min_available_nodes": 2,
        "min_train_nodes": 1,
        "delta": DELTA,
        "audit": "one-run",
        "audit_canaries": 1000,
        "results_dir": str(tmp_path / "results"),
        "update_compression": "none",  # the honest replies below are float32 updates
    }
    values.update(overrides)
    (tmp_path / "results").mkdir(parents=True, exist_ok=True)
    strategy = make_strategy(RunConfig(**values), tmp_path / "results")
    assert isinstance(strategy, ClientLevelFedAvg)
    strategy.start_run(range(1, N_CLIENTS + 1))
    return strategy


def _honest_reply(instruction: Message, rng: np.random.Generator) -> Message:
    """An honest node: a random model change, clipped to the round's C before it leaves."""
    node = instruction.metadata.dst_node_id
    clip = float(instruction.content["config"]["clip-norm"])
    raw = [rng.normal(size=s).astype(np.float32) for s in MODEL.values()]
    clipped = clip_update(raw, clip)
    delivered = make_message(instruction.content, instruction.metadata.message_type, node)
    report = TrainReport.client_update(node, clipped.below_clip, None, None)
    update = ArrayRecord({k: Array(a) for k, a in zip(MODEL, clipped.arrays, strict=True)})
    return Message(report.to_content(update), reply_to=delivered)


def _run(
    strategy: ClientLevelFedAvg, rounds: int, seed: int
) -> tuple[ArrayRecord, ArrayRecord]:
    """``rounds`` rounds of honest clients; returns the initial and final arrays."""
    rng = np.random.default_rng(seed)
    arrays = initial = _initial()
    grid = _Nodes(range(1, N_CLIENTS + 1))
    for server_round in range(1, rounds + 1):
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        replies = [_honest_reply(m, rng) for m in messages]
        new, _ = strategy.aggregate_train(server_round, replies)
        assert new is not None
        arrays = new
    return initial, arrays


def _server_noise(cfg: RunConfig, settings: ClientLevelSettings, rounds: int) -> np.ndarray:
    """What the server of a reproducible-noise run added, replayed from the seed alone:
    the same generator and draws as ClientLevelAggregator, summed over the rounds and
    divided by q·n (server learning rate 1, no momentum)."""
    total = []
    for server_round in range(1, rounds + 1):
        generator = round_generator(
            reproducible_seed(cfg.seed, SERVER_PARTITION, server_round)
        )
        std = settings.update_noise_multiplier * settings.initial_clip_norm
        noise = [
            gaussian_noise(std, torch.zeros(shape, dtype=torch.float64), generator).numpy()
            for shape in MODEL.values()
        ]
        total.append(np.concatenate([a.ravel() for a in noise]))
    return np.sum(total, axis=0) / settings.expected_cohort


def _flat(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate(
        [a.ravel().astype(np.float64) for a in arrays.to_numpy_ndarrays()]
    )


# == 1. the audit sees a leak, and stays below ε where there is none ===============
def test_removing_replayable_noise_gives_a_bound_above_the_reported_epsilon(
    tmp_path: Path,
) -> None:
    """reproducible-noise: the test plays the server, regenerates its noise from the
    seed and subtracts it. The de-noised model change gives a 95 % lower bound above
    the ledger's ε (2); the real noised model's bound stays below it."""
    rounds = 10
    strategy = _strategy(tmp_path, Z_EPS2_10_ROUNDS, rounds, reproducible_noise=True)
    initial, final = _run(strategy, rounds, seed=1)
    reported = strategy.ledger.epsilon()
    assert 1.9 < reported <= 2.0

    block = strategy.audit_block(final)
    assert block is not None
    assert block["epsilon_lower_bound"] < reported
    canaries = strategy.canaries
    assert canaries is not None
    # The de-noised final model: what the server knows once it replays its noise.
    noise = _server_noise(strategy.cfg, strategy._settings(), rounds)
    cos = canaries.cosines([_flat(final) - noise])
    leaked = one_run_lower_bound(cos.tolist(), canaries.included.tolist(), DELTA)
    estimate = one_shot_estimate(
        cos[canaries.included], cos[~canaries.included], canaries.dimension, DELTA
    )
    print(f"reported ε {reported:.3f}; noised: bound {block['epsilon_lower_bound']:.3f}, "
          f"estimate {block['epsilon_estimate']:.3f}; de-noised: bound "
          f"{leaked.epsilon_lower_bound:.3f}, estimate {estimate.epsilon:.3f}")  # fmt: skip
    assert leaked.epsilon_lower_bound > reported + 1.0
    assert estimate.epsilon > 10 * reported


def _canary_contributions(strategy: ClientLevelFedAvg) -> int:
    assert strategy.canaries is not None
    return int(strategy.canaries.times_sampled.sum())


@pytest.mark.parametrize(
    ("z", "low", "high"), [(Z_EPS1_5_ROUNDS, 0.9, 1.0), (Z_EPS8_5_ROUNDS, 7.9, 8.0)]
)
def test_lower_bound_never_exceeds_the_ledgers_epsilon(
    tmp_path: Path, z: float, low: float, high: float
) -> None:
    """Soundness on DP runs (OS-entropy noise and cohorts), three seeds per ε: the 95 %
    one-run bound stays at most the federation ledger's ε; the estimate is reported."""
    rows = []
    for seed in (1, 2, 3):
        strategy = _strategy(tmp_path / str(seed), z, 5, seed=seed)
        _, final = _run(strategy, 5, seed=seed)
        reported = strategy.ledger.epsilon()
        assert low < reported <= high
        block = strategy.audit_block(final)
        assert block is not None and block["reported_epsilon"] == reported
        assert _canary_contributions(strategy) > 0
        rows.append((reported, block["epsilon_lower_bound"], block["epsilon_estimate"]))
        assert block["epsilon_lower_bound"] <= reported
    print("reported ε, lower bound, estimate:", rows)


def test_without_noise_the_estimate_is_large_and_the_bound_clearly_positive() -> None:
    """z ≈ 0 (no DP), 10 rounds: included canaries stand out; estimate ≫ 1, bound > 3."""
    d = sum(math.prod(s) for s in MODEL.values())
    settings = ClientLevelSettings(Q, N_CLIENTS, 1e-9, "fixed", 1.0)
    aggregator = ClientLevelAggregator(settings)
    like = [np.zeros(d, np.float32)]
    canaries = CanaryClients(1000, 5, Q, like)
    rng, cohort = np.random.default_rng(5), random.Random(5)
    model = np.zeros(d)
    for _ in range(10):
        real = [
            (list(clip_update([rng.normal(size=d).astype(np.float32)], 1.0).arrays), True)
            for _ in range(N_CLIENTS)
            if cohort.random() < Q
        ]
        agg = aggregator.aggregate(
            like, real, round_generator(), canaries=canaries.round_updates(1.0, cohort)
        )
        model += agg.mean_update[0]
    block = canaries.audit([model.astype(np.float32)], DELTA, None)
    print("no noise:", block["epsilon_estimate"], block["epsilon_lower_bound"])
    assert block["epsilon_estimate_infinite"] or block["epsilon_estimate"] > 20
    assert block["epsilon_lower_bound"] > 3
    assert block["cosine_in"]["mean"] > 2 * block["null_std"]
    assert abs(block["cosine_out"]["mean"]) < block["null_std"]


# == 2. canaries are clients like the others, and change nobody's accounting ========
def test_a_canary_update_is_clipped_to_C_like_a_real_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two included canaries sampled every round (q 1), no real replies, the server's
    replayable noise removed: the average times q·n is their sum, at most C each, even
    when a canary's update is made 5× too long (the aggregator clips it, as it clips a
    client that did not)."""
    strategy = _strategy(
        tmp_path, 0.01, 1, client_sampling_rate=1.0, audit_canaries=2, delta=1e-3,
        reproducible_noise=True,
    )  # fmt: skip
    list(strategy.configure_train(1, _initial(), ConfigRecord(), _Nodes(range(1, 51))))
    canaries = strategy.canaries
    assert canaries is not None
    monkeypatch.setattr(canaries, "included", np.array([True, True]))
    monkeypatch.setattr(canaries, "directions", canaries.directions * 5)
    final, _ = strategy.aggregate_train(1, [])
    assert final is not None
    noise = _server_noise(strategy.cfg, strategy._settings(), 1)
    change = (
        _flat(final) - _flat(_initial()) - noise
    ) * strategy._settings().expected_cohort
    units = canaries.directions.astype(np.float64).T / 5
    parts, residual, *_ = np.linalg.lstsq(units, change)  # change = Σ parts_i · u_i
    assert np.all(parts <= 1.0) and np.all(parts > 0.99)  # ≤ C = 1 each
    assert residual[0] < 1e-6
    assert np.linalg.norm(change) <= 2.0  # triangle inequality; unclipped: ~14
    assert strategy.last_round is not None
    assert strategy.last_round.cohort == 0  # canaries are not in rounds.jsonl's cohort


def test_canaries_leave_the_real_clients_accounting_unchanged(tmp_path: Path) -> None:
    """Same run with and without 1,000 canaries: n, q, z, q·n, the noise, ε and the
    ledger are the same; δ < 1/n counts the 50 real nodes (δ 0.019 > 1/1050 passes);
    the cohort size and clipped fraction in rounds.jsonl are the real nodes'."""
    facts = {}
    for audit in ("off", "one-run"):
        strategy = _strategy(tmp_path / audit, Z_EPS8_5_ROUNDS, 2, audit=audit, delta=0.019)
        _run(strategy, 2, seed=4)
        block = strategy.summary_block()
        privacy = strategy.round_privacy()["client_level"]
        assert privacy["cohort_size"] == len(strategy.cohort)
        assert privacy["clipped_fraction"] == 1.0  # every real change > C; canaries are not
        facts[audit] = (
            {k: block[k] for k in ("population", "sampling_rate", "expected_cohort",
                                   "noise_multiplier", "update_noise_multiplier",
                                   "epsilon", "history", "delta")},
            json.loads(strategy.ledger.path.read_text())["ledger"]["history"],
        )  # fmt: skip
        assert (strategy.canaries is not None) == (audit == "one-run")
    assert facts["off"] == facts["one-run"]
    assert facts["off"][0]["population"] == N_CLIENTS
    assert facts["off"][0]["expected_cohort"] == Q * N_CLIENTS


def test_canary_design_is_seeded_and_balanced() -> None:
    """Directions are unit vectors, inclusion is ½, both fixed by the seed (the auditor's
    design); another seed gives other canaries."""
    like = [np.zeros((40, 100), np.float32)]
    a, b, c = (CanaryClients(1000, s, Q, like) for s in (3, 3, 4))
    assert np.allclose(np.linalg.norm(a.directions, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(a.included, b.included) and np.array_equal(
        a.directions, b.directions
    )
    assert not np.array_equal(a.included, c.included)
    assert 450 < a.included.sum() < 550
    with pytest.raises(ValueError, match="'audit-canaries'"):
        CanaryClients(1, 3, Q, like)


def test_too_few_canaries_on_one_side_give_a_bound_but_no_estimate() -> None:
    """m = 2, both included: no Gaussian fit of the excluded side, so no estimate (and
    no crash at the end of the run); the one-run bound is still computed."""
    like = [np.zeros(50, np.float32)]
    canaries = CanaryClients(2, 3, Q, like)
    canaries.included = np.array([True, True])
    block = canaries.audit([np.ones(50, np.float32)], DELTA, 1.0)
    assert block["epsilon_estimate"] is None and block["cosine_out"]["mean"] is None
    assert block["canaries"] == 2 and block["epsilon_lower_bound"] == 0.0
    assert "one-shot estimate ε ≈ none (fewer than 2" in canary_audit_line(block)
    assert block["epsilon_estimate_infinite"] is False


def test_audit_block_and_plot(tmp_path: Path) -> None:
    """The summary block names the methods, inclusion, score, δ, confidence and d, is
    JSON, and the plot is written; the log line puts the bound beside ε."""
    strategy = _strategy(tmp_path, Z_EPS8_5_ROUNDS, 1)
    _, final = _run(strategy, 1, seed=2)
    block = strategy.audit_block(final)
    assert block is not None
    json.dumps(block, allow_nan=False)
    assert block["canaries"] == 1000 and block["inclusion_probability"] == 0.5
    assert block["score"] == "cosine with final model change"
    assert block["delta"] == DELTA and block["confidence"] == 0.95
    assert block["dimension"] == 4100 and block["privacy_unit"] == "client"
    assert block["method"].startswith("steinke-nasr-jagielski-2023")
    assert block["estimate_method"].startswith("andrew-et-al-2024")
    assert 450 < block["included"] < 550
    assert (tmp_path / "results" / block["plot"]).stat().st_size > 5000
    line = canary_audit_line(block)
    assert "lower bound" in line and "one-shot estimate" in line
    off = _strategy(tmp_path / "off", Z_EPS8_5_ROUNDS, 1, audit="off")
    assert off.audit_block(final) is None


# == 3. the estimator against values worked out independently ======================
@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_equal_variance_pair_is_the_gaussian_mechanism(mu: float, delta: float) -> None:
    """N(μ, 1) vs N(0, 1) is the Gaussian mechanism with noise multiplier 1/μ: ε equals
    dp-accounting's PLD, and Balle & Wang 2018's analytic δ(ε) curve gives back δ."""
    eps = epsilon_of_gaussians(0.0, 1.0, mu, 1.0, delta)
    pld = PLDAccountant(value_discretization_interval=1e-4)
    expected = pld.compose(dp_event.GaussianDpEvent(1 / mu)).get_epsilon(delta)
    assert eps == pytest.approx(expected, rel=1e-4)
    analytic = stats.norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * stats.norm.cdf(
        -mu / 2 - eps / mu
    )
    assert analytic == pytest.approx(delta, rel=1e-6)
    assert epsilon_of_gaussians(3.0, 2.0, 3.0 + 2 * mu, 2.0, delta) == pytest.approx(eps)


@pytest.mark.parametrize(
    ("p", "q"),
    [((0.0, 1.0), (1.0, 2.0)), ((0.0, 1.0), (0.5, 0.8)), ((0, 0.01), (0.02, 0.012))],
)
def test_unequal_variance_epsilon_solves_the_integrated_hockey_stick(
    p: tuple[float, float], q: tuple[float, float]
) -> None:
    """With unequal variances the privacy loss is quadratic; at the returned ε the
    larger of the two hockey-stick divergences, integrated numerically, is δ."""
    delta = 1e-3
    eps = epsilon_of_gaussians(*p, *q, delta)

    def hockey(a: tuple[float, float], b: tuple[float, float]) -> float:
        def f(x: float) -> float:
            return max(0.0, stats.norm.pdf(x, *a) - math.exp(eps) * stats.norm.pdf(x, *b))

        scale = max(a[1], b[1])
        lo, hi = min(a[0], b[0]) - 40 * scale, max(a[0], b[0]) + 40 * scale
        return integrate.quad(f, lo, hi, points=[a[0], b[0]], limit=500)[0]

    assert max(hockey(p, q), hockey(q, p)) == pytest.approx(delta, rel=1e-3)
    assert epsilon_of_gaussians(*q, *p, delta) == pytest.approx(eps)


def test_identical_gaussians_are_zero_and_separated_ones_large() -> None:
    assert epsilon_of_gaussians(0.0, 1.0, 0.0, 1.0, DELTA) == 0.0
    assert epsilon_of_gaussians(0.0, 1.0, 1e6, 1.0, DELTA) == math.inf
    # ε decreases in δ and increases in the separation.
    assert epsilon_of_gaussians(0, 1, 1, 1, 1e-6) > epsilon_of_gaussians(0, 1, 1, 1, 1e-3)
    assert epsilon_of_gaussians(0, 1, 2, 1, DELTA) > epsilon_of_gaussians(0, 1, 1, 1, DELTA)


def _exactly(mean: float, std: float, size: int, seed: int) -> np.ndarray:
    draws = np.random.default_rng(seed).normal(size=size)
    return mean + std * (draws - draws.mean()) / draws.std(ddof=1)


def test_one_shot_estimate_fits_the_included_cosines_against_the_null() -> None:
    """Included cosines with sample mean k/√d and sample std 1/√d: the estimate is the
    Gaussian mechanism's ε for μ = k; with mean 0 it is 0. The empirical null uses the
    excluded canaries' fitted Gaussian."""
    d = 4000
    null = d**-0.5
    out = _exactly(0.0, null, 500, 1)
    for k, expected in ((0.0, 0.0), (1.0, epsilon_of_gaussians(0, 1, 1, 1, DELTA))):
        est = one_shot_estimate(_exactly(k * null, null, 500, 2), out, d, DELTA)
        assert est.epsilon == pytest.approx(expected, abs=1e-6)
        assert est.epsilon_empirical_null == pytest.approx(expected, abs=1e-6)
        assert est.mean_in == pytest.approx(k * null) and est.std_out == pytest.approx(null)
    wider = one_shot_estimate(_exactly(0.0, 1.5 * null, 500, 2), out, d, DELTA)
    assert wider.epsilon == pytest.approx(epsilon_of_gaussians(0, 1, 0, 1.5, DELTA))
    with pytest.raises(ValueError, match="included"):
        one_shot_estimate([0.1], out, d, DELTA)


# == 4. end to end ==================================================================
@pytest.mark.e2e
def test_client_level_audit_run_writes_the_block_and_the_plot(tmp_path: Path) -> None:
    """A real 4-client digits simulation, 2 rounds, audit = "one-run": summary.json's
    audit block beside the ledger's ε, the plot, the log line; no process left."""
    from tests.helpers.process_watch import assert_all_gone, run_watched

    results = tmp_path / "run"
    code, out, watch = run_watched(
        [
            "--clients", "4", "--rounds", "2", "--noise-multiplier", "1.0",
            "--set", 'privacy-mode="client"', "--set", "client-sampling-rate=0.5",
            "--set", 'audit="one-run"', "--set", "audit-canaries=100",
            "--results-dir", str(results),
        ]
    )  # fmt: skip
    assert code == 0, out[-4000:]
    summary = json.loads((results / "summary.json").read_text())
    audit = summary["audit"]
    assert audit["privacy_unit"] == "client" and audit["canaries"] == 100
    assert audit["reported_epsilon"] == summary["client_level"]["epsilon"]
    assert 0 <= audit["epsilon_lower_bound"] <= audit["reported_epsilon"]
    assert audit["delta"] == summary["delta"]
    assert (results / audit["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "client-level audited ε lower bound" in out
    white = audit["white_box"]  # every round's release, scored by the server
    assert white["rounds_observed"] == 2 and white["canaries"] == 100
    assert 0 <= white["epsilon_lower_bound"] <= audit["reported_epsilon"]
    assert (results / white["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "white-box (every round's update) ε ≥" in out
    # Canaries are not clients: rounds.jsonl's cohorts hold the 4 real nodes only.
    for line in (results / "rounds.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["client_level"]["cohort_size"] == len(record["clients"]) <= 4
    assert_all_gone(watch)
