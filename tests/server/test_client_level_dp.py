"""Client-level DP (DP-FedAvg, issue 9) checked in process, from the attacker's side.

ε is recomputed with Google's dp-accounting, which privfed does not use; noise is
measured on large arrays; the noise-free part of an aggregate is isolated by
replaying the same seeded generator (``round_generator(seed)``) on an empty round
and subtracting. Loop-level tests drive ``run_rounds`` with the real ClientApp
through the in-process grid of ``tests/common/test_data_checks.py`` (no Flower processes).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant
from scipy import stats

import client.app as client_app
from common.config import ConfigError, RunConfig
from common.ledger.privacy_ledger import PrivacyLedger, epsilon_of_history
from common.privacy.client_level_plan import (
    ClientLevelSettings,
    client_noise_multiplier,
    plan_client_level,
)
from common.privacy.randomness import round_generator
from common.privacy.update_clipping import CLIP_MARGIN
from common.tasks.models import build_model
from common.wire.reply import TrainReport
from common.wire.reply_fields import CLIP_NORM_KEY, UPDATE_KEY, Status
from server.app import make_strategy, summarise
from server.checks.federation_ledger import LEDGER_FILE, FederationLedger
from server.federation_loop import run_rounds
from server.results.epsilon_text import epsilon_text
from server.results.run_folder import ResultsWriter
from server.strategies import client_level_dp
from server.strategies.client_level import ClientLevelFedAvg
from server.strategies.client_level_dp import ClientLevelAggregator, poisson_cohort
from simulations.launch.in_process_federation import InProcessGrid
from tests.helpers.device import write_policy
from tests.helpers.messages import make_context, make_message, train_message

DELTA = 1e-5
OPACUS_ORDERS = [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Server-side messages need the task identity a ServerApp process has."""
    for key, value in {"_run_id": 7, "_node_id": 1, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, key, value)


# -- independent accounting ---------------------------------------------------------
def _google_event(history: Iterable[Sequence[float]]) -> dp_event.DpEvent:
    """The ledger's history as dp-accounting events: Poisson-sampled Gaussians."""
    return dp_event.ComposedDpEvent(
        [
            dp_event.SelfComposedDpEvent(
                dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), int(n)
            )
            for z, q, n in history
        ]
    )


def _google_rdp(history: Iterable[Sequence[float]], delta: float = DELTA) -> float:
    # The same orders as Opacus, so both RDP curves are minimised over the same grid.
    accountant = RdpAccountant(orders=OPACUS_ORDERS)
    return float(accountant.compose(_google_event(history)).get_epsilon(delta))


def _google_pld(history: Iterable[Sequence[float]], delta: float = DELTA) -> float:
    accountant = PLDAccountant(value_discretization_interval=1e-3)
    return float(accountant.compose(_google_event(history)).get_epsilon(delta))


def _assert_matches_google(reported: float, history: list[Sequence[float]]) -> None:
    """RDP within 1 %; PLD at most the reported ε (+1 %) and not absurdly below it.

    RDP → (ε, δ) conversion is an upper bound; PLD accounts the privacy loss
    distribution numerically and is tighter, typically 10-30 % lower for these
    (z, q). A reported ε below PLD would claim more privacy than the mechanism has;
    one far above it (< 0.6 × ε) would mean the history was misrecorded.
    """
    assert reported == pytest.approx(_google_rdp(history), rel=0.01)
    pld = _google_pld(history)
    assert 0.6 * reported <= pld <= 1.01 * reported, (pld, reported)


# -- helpers ------------------------------------------------------------------------
def _client_cfg(tmp_path: Path, **overrides: Any) -> RunConfig:
    values: dict[str, Any] = {
        "privacy_mode": "client",
        "target_epsilon": 0.0,
        "noise_multiplier": 1.0,
        "client_sampling_rate": 0.5,
        "client_clip_norm": 0.5,
        "num_rounds": 3,
        "min_available_nodes": 2,
        "min_train_nodes": 1,
        "results_dir": str(tmp_path / "results"),
        "update_compression": "none",  # float32 (compressed: test_update_compression)
    }
    values.update(overrides)
    return RunConfig(**values)


def _fixed(
    z: float = 1.0, c: float = 2.0, q: float = 0.1, n: int = 1000, **kw: Any
) -> ClientLevelSettings:
    return ClientLevelSettings(q, n, z, kw.pop("clipping", "fixed"), c, **kw)


def _replayed_signal(
    settings: ClientLevelSettings,
    like: list[np.ndarray],
    updates: list[tuple[list[np.ndarray], bool]],
    seed: int = 99,
) -> tuple[list[np.ndarray], Any]:
    """The aggregate's noise-free part: the aggregate minus an empty round that draws
    exactly the same noise (same seeded generator, same settings)."""
    noisy = ClientLevelAggregator(settings).aggregate(like, updates, round_generator(seed))
    noise = ClientLevelAggregator(settings).aggregate(like, [], round_generator(seed))
    signal = [a - b for a, b in zip(noisy.mean_update, noise.mean_update, strict=True)]
    return signal, noisy


TINY_MODEL = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}


def _tiny_arrays() -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in TINY_MODEL.items()})


class _Nodes:
    """A grid that only lists node ids (the strategy's cohort sampling needs no more)."""

    def __init__(self, ids: Iterable[int]) -> None:
        self.ids = list(ids)

    def get_node_ids(self) -> list[int]:
        return self.ids


def _update_reply(
    instruction: Message, arrays: dict[str, np.ndarray], below_clip: bool = True
) -> Message:
    """A node's client-level reply to ``instruction``, built by hand (any content)."""
    node = instruction.metadata.dst_node_id
    delivered = make_message(instruction.content, instruction.metadata.message_type, node)
    report = TrainReport.client_update(node, below_clip, None, None)
    update = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return Message(report.to_content(update), reply_to=delivered)


def _strategy(tmp_path: Path, population: int, **overrides: Any) -> ClientLevelFedAvg:
    cfg = _client_cfg(tmp_path, **overrides)
    (tmp_path / "results").mkdir(parents=True, exist_ok=True)
    strategy = make_strategy(cfg, tmp_path / "results")
    assert isinstance(strategy, ClientLevelFedAvg)
    strategy.start_run(range(1, population + 1))  # the test grids' node ids
    return strategy


def _small_update(node: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return {k: (rng.normal(size=v.shape) * 0.01).astype(np.float32)
            for k, v in TINY_MODEL.items()}  # fmt: skip


# == 1. accounting ==================================================================
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_federation_ledger_epsilon_matches_dp_accounting(
    tmp_path: Path, accountant: str
) -> None:
    """A history with changing (z, q): the ledger's ε and its file's ε equal Google's."""
    ledger = FederationLedger(tmp_path, accountant, DELTA, math.inf, run_id=3)
    # Opacus' PRV takes ~0.5 s per ε, and the ledger computes ε every round.
    repeat = 20 if accountant == "rdp" else 1
    plan = [(1.0, 0.05)] * 2 * repeat + [(1.5, 0.1)] * repeat + [(0.9, 1.0)]
    for server_round, (z, q) in enumerate(plan, start=1):
        ledger.record_round(server_round, z, q, {"clip_norm": 1.0})
    on_disk = json.loads((tmp_path / LEDGER_FILE).read_text())
    history = on_disk["ledger"]["history"]
    assert history == [[1.0, 0.05, 2 * repeat], [1.5, 0.1, repeat], [0.9, 1.0, 1]]
    assert on_disk["privacy_unit"] == "client" and on_disk["delta"] == DELTA
    assert on_disk["epsilon"] == pytest.approx(ledger.epsilon(), rel=1e-12)
    if accountant == "rdp":
        _assert_matches_google(on_disk["epsilon"], history)
    else:  # Opacus' PRV and Google's PLD are both numerical, near-exact accountants.
        assert on_disk["epsilon"] == pytest.approx(_google_pld(history), rel=0.01)


def test_calibrated_noise_ends_at_the_target_epsilon(tmp_path: Path) -> None:
    """target-epsilon 3, q 0.01, 300 rounds: z gives 2.9 < ε ≤ 3, as Google computes."""
    cfg = _client_cfg(
        tmp_path, target_epsilon=3.0, noise_multiplier=0.0, client_sampling_rate=0.01,
        num_rounds=300,
    )  # fmt: skip
    z = client_noise_multiplier(cfg)
    history = [(z, 0.01, 300)]
    ours = epsilon_of_history(history, DELTA, "rdp")
    assert 2.9 < ours <= 3.0
    assert 2.9 < _google_rdp(history) <= 3.0 * 1.01
    _assert_matches_google(ours, history)


# == 2. the adaptive noise split ====================================================
def test_adaptive_split_composes_to_exactly_z() -> None:
    """The update's z_Δ and the count's 2σ_b on one Poisson cohort are one Gaussian z.

    The real mechanism noises the update and the count of the *same* cohort, so it
    is PoissonSampled(Composed(G(z_Δ), G(2σ_b))); its RDP equals PoissonSampled(G(z))
    up to float, for one round and for many. Accounting the two as separately
    sampled mechanisms would be a different, smaller number (not this run's
    mechanism): the ledger must record z, and it does (test below).
    """
    z, sigma_b = 1.1, 4.0
    settings = _fixed(z, q=0.02, n=5000, clipping="adaptive", clipped_count_stddev=sigma_b)
    z_update = settings.update_noise_multiplier
    assert z_update == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5, rel=1e-12)
    assert z_update > z  # the update gets more noise, so that both together cost z

    def eps(event: dp_event.DpEvent, rounds: int) -> float:
        accountant = RdpAccountant(orders=OPACUS_ORDERS)
        return float(accountant.compose(event, rounds).get_epsilon(DELTA))

    split = dp_event.ComposedDpEvent(
        [dp_event.GaussianDpEvent(z_update), dp_event.GaussianDpEvent(2 * sigma_b)]
    )
    assert eps(split, 1) == pytest.approx(eps(dp_event.GaussianDpEvent(z), 1), rel=1e-9)
    q = settings.sampling_rate
    for rounds in (1, 400):
        joint = eps(dp_event.PoissonSampledDpEvent(q, split), rounds)
        single = eps(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rounds)
        assert joint == pytest.approx(single, rel=1e-9)
        assert single == pytest.approx(
            epsilon_of_history([(z, q, rounds)], DELTA, "rdp"), rel=0.01
        )
    # Had z_Δ been z (the count's noise not paid for), the run would spend more.
    unpaid = dp_event.ComposedDpEvent(
        [dp_event.GaussianDpEvent(z), dp_event.GaussianDpEvent(2 * sigma_b)]
    )
    assert eps(dp_event.PoissonSampledDpEvent(q, unpaid), 400) > 1.01 * eps(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), 400
    )


def test_count_noise_too_small_to_split_is_refused_naming_the_key(tmp_path: Path) -> None:
    """2σ_b ≤ z leaves nothing for the update: ConfigError naming the key."""
    with pytest.raises(ConfigError, match="'clipped-count-stddev'"):
        _fixed(1.0, clipping="adaptive", clipped_count_stddev=0.5)
    cfg = _client_cfg(tmp_path, clipping="adaptive", clipped_count_stddev=0.4)
    with pytest.raises(ConfigError, match="'clipped-count-stddev'"):
        plan_client_level(cfg, 1000)
    # The default σ_b = q·n / 20 is too small for 10 expected clients at z = 1.
    with pytest.raises(ConfigError, match="'clipped-count-stddev'.*more clients"):
        plan_client_level(_client_cfg(tmp_path, clipping="adaptive"), 20)
    assert plan_client_level(_client_cfg(tmp_path, clipping="adaptive"), 1000)
    with pytest.raises(ConfigError, match="'delta'"):  # δ must be below 1/n
        plan_client_level(_client_cfg(tmp_path), 100_000)


# == 3. Poisson client selection ====================================================
@pytest.mark.parametrize("source", ["seeded", "os-entropy"])
def test_poisson_cohorts_have_rate_q_and_binomial_sizes(
    source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2000 rounds over 60 nodes at q = 0.05: rate q, sizes Binomial(60, q), empties.

    Flower's fixed-size ``random.sample`` would give a variance of 0; a cohort that
    drew nodes in a correlated way would fail the per-node and size tests. The OS
    entropy path (one ``os.urandom`` read a round) is fed seeded bytes here, so that
    the statistical checks cannot fail by chance.
    """
    n, q, rounds = 60, 0.05, 2000
    rng: random.Random = random.Random(20240601)
    if source == "os-entropy":
        monkeypatch.setattr(client_level_dp.os, "urandom", rng.randbytes)
        rng = random.SystemRandom()
    nodes = list(range(100, 100 + n))
    cohorts = [poisson_cohort(nodes, q, rng) for _ in range(rounds)]
    sizes = np.array([len(c) for c in cohorts])
    selected = sizes.sum()
    z_score = (selected / (rounds * n) - q) / math.sqrt(q * (1 - q) / (rounds * n))
    assert abs(z_score) < 4
    per_node = np.array([sum(node in c for c in cohorts) for node in nodes])
    assert per_node.sum() == selected and all(len(set(c)) == len(c) for c in cohorts)
    # Each node's count is Binomial(rounds, q): no node favoured or skipped.
    assert stats.chisquare(per_node).pvalue > 1e-3
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.15)
    # Goodness of fit of the sizes to Binomial(n, q) (tail bins pooled).
    top = 7
    observed = np.array([np.sum(sizes == k) for k in range(top)] + [np.sum(sizes >= top)])
    pmf = stats.binom.pmf(range(top), n, q)
    expected = rounds * np.append(pmf, 1 - pmf.sum())
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    assert observed[0] > 0  # empty cohorts happen (P = 0.95^60 ≈ 4.6 %)


def test_os_entropy_cohort_is_one_read_of_53_bit_fractions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The OS entropy path reads 8 bytes a node in one call and keeps a node when the
    top 53 bits of its word, over 2^53, are below q (as ``SystemRandom.random() < q``):
    at q = 1/2 the word just below one half is kept and one half itself is not."""
    half = 2**52  # 0.5 · 2^53
    words = [(half - 1) << 11, half << 11, 0, (2**53 - 1) << 11 | 0x7FF]
    reads: list[int] = []

    def urandom(size: int) -> bytes:
        reads.append(size)
        return np.array(words[: size // 8], dtype=np.uint64).tobytes()

    monkeypatch.setattr(client_level_dp.os, "urandom", urandom)
    assert poisson_cohort([11, 12, 13, 14], 0.5, random.SystemRandom()) == [11, 13]
    assert reads == [32]
    assert poisson_cohort([], 0.5, random.SystemRandom()) == []
    # Real entropy: all or none at the extremes, and a fresh draw each round.
    monkeypatch.undo()
    nodes = list(range(1000))
    assert poisson_cohort(nodes, 1.0, random.SystemRandom()) == nodes
    assert poisson_cohort(nodes, 0.0, random.SystemRandom()) == []
    draws = {tuple(poisson_cohort(nodes, 0.5, random.SystemRandom())) for _ in range(3)}
    assert len(draws) == 3


def test_strategy_instructs_a_poisson_cohort_each_round(tmp_path: Path) -> None:
    """configure_train sends to a cohort whose size varies, mean q·n, sometimes none.

    Seeded (reproducible-noise) so that the statistics are deterministic.
    """
    strategy = _strategy(tmp_path, 40, client_sampling_rate=0.1, reproducible_noise=True)
    arrays, grid = _tiny_arrays(), _Nodes(range(1, 41))
    sizes = []
    for server_round in range(1, 301):
        messages = list(
            strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        )
        assert {m.metadata.dst_node_id for m in messages} == set(strategy.cohort)
        assert all(m.content["config"][CLIP_NORM_KEY] == 0.5 for m in messages)
        sizes.append(len(messages))
    assert np.mean(sizes) == pytest.approx(4.0, abs=0.5)
    assert np.var(sizes) == pytest.approx(40 * 0.1 * 0.9, rel=0.3)
    assert 0 in sizes


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_empty_cohort_round_adds_noise_only(clipping: str) -> None:
    """No updates: the average is pure N(0, (z_Δ·C/(q·n))²) noise, C unchanged if fixed."""
    sigma_b = 5.0 if clipping == "adaptive" else 0.0
    settings = _fixed(
        1.0, c=2.0, q=0.1, n=1000, clipping=clipping, clipped_count_stddev=sigma_b
    )
    like = [np.zeros(300_000), np.zeros((100, 100))]
    agg = ClientLevelAggregator(settings).aggregate(like, [], round_generator(11))
    values = np.concatenate([a.ravel() for a in agg.mean_update])
    want = settings.update_noise_multiplier * 2.0 / 100
    assert np.std(values) == pytest.approx(want, rel=0.01)
    assert abs(np.mean(values)) < 5 * want / math.sqrt(values.size)
    assert agg.cohort == 0 and agg.clipped_fraction is None
    assert (agg.next_clip_norm == 2.0) == (clipping == "fixed")


# == 4. denominator and noise =======================================================
def test_noise_std_is_zC_over_qn_not_over_the_replies() -> None:
    """37 zero updates with q·n = 100: std z·C/100 (over 37 it would be 2.7× larger)."""
    settings = _fixed(1.3, c=0.7, q=0.1, n=1000)
    like = [np.zeros(400_000)]
    updates = [([np.zeros(400_000)], True) for _ in range(37)]
    agg = ClientLevelAggregator(settings).aggregate(like, updates, round_generator(12))
    assert np.std(agg.mean_update[0]) == pytest.approx(1.3 * 0.7 / 100, rel=0.01)
    assert agg.cohort == 37 and agg.clipped_fraction == 0.0


def test_mean_divides_by_expected_cohort() -> None:
    """Identical updates u from m = 37 clients average to 37·u/100, not u."""
    settings = _fixed(1.0, c=10.0, q=0.1, n=1000)
    u = [np.linspace(-1, 1, 50), np.full((2, 3), 0.25)]
    like = [np.zeros_like(a) for a in u]
    signal, agg = _replayed_signal(settings, like, [(u, True)] * 37)
    for got, part in zip(signal, u, strict=True):
        np.testing.assert_allclose(got, 37 * part / 100, atol=1e-12)
    assert agg.clipped_fraction == 0.0


# == 5. clipping, from the attacker's side ==========================================
def test_unclipped_update_contributes_at_most_C_and_counts_as_clipped() -> None:
    """A client sends 100·C claiming below-clip: the server clips it and counts it."""
    c = 0.5
    settings = _fixed(1.0, c=c, q=0.1, n=100)
    direction = np.random.default_rng(0).normal(size=1000)
    direction /= np.linalg.norm(direction)
    huge = [direction * 100 * c]
    signal, agg = _replayed_signal(settings, [np.zeros(1000)], [(huge, True)])
    kept = c * (1 - CLIP_MARGIN)  # clipped a hair under C, so float32 stays <= C
    assert np.linalg.norm(signal[0] * 10) == pytest.approx(kept, rel=1e-9)  # × q·n
    assert np.linalg.norm(signal[0] * 10) <= c
    np.testing.assert_allclose(signal[0] * 10, direction * kept, atol=1e-12)
    assert agg.clipped_fraction == 1.0


def test_lying_about_the_clip_bit_does_not_move_adaptive_C() -> None:
    """An update above C with below-clip=True moves C exactly as an honest False does."""
    settings = _fixed(
        1.0, c=1.0, q=0.5, n=20, clipping="adaptive", clipped_count_stddev=2.0
    )
    big, small = [np.full(4, 3.0)], [np.full(4, 0.1)]
    lying = [(big, True), (small, True)]
    honest = [(big, False), (small, True)]
    a = ClientLevelAggregator(settings).aggregate([np.zeros(4)], lying, round_generator(5))
    b = ClientLevelAggregator(settings).aggregate([np.zeros(4)], honest, round_generator(5))
    assert a.next_clip_norm == b.next_clip_norm and a.clipped_fraction == 0.5
    assert a.noised_below_fraction == b.noised_below_fraction
    # ... and an honest below-clip bit does move it (the test could fail).
    c = ClientLevelAggregator(settings).aggregate(
        [np.zeros(4)], [(small, True), (small, True)], round_generator(5)
    )
    assert c.next_clip_norm != a.next_clip_norm


BAD_UPDATES: dict[str, dict[str, Any]] = {
    "nan": {"w": np.full((3, 4), np.nan, np.float32), "b": np.zeros(4, np.float32)},
    "inf": {"w": np.zeros((3, 4), np.float32), "b": np.full(4, np.inf, np.float32)},
    "shape": {"w": np.zeros((4, 3), np.float32), "b": np.zeros(4, np.float32)},
    "dtype": {"w": np.zeros((3, 4), np.float64), "b": np.zeros(4, np.float64)},
    "int": {"w": np.zeros((3, 4), np.int32), "b": np.zeros(4, np.int32)},
    "keys": {"weight": np.zeros((3, 4), np.float32), "bias": np.zeros(4, np.float32)},
    "missing": {"w": np.zeros((3, 4), np.float32)},
    # C = 0.5: an honest client clips before sending; the server rejects, not re-clips
    "over-norm": {"w": np.full((3, 4), 0.2, np.float32), "b": np.zeros(4, np.float32)},
}


def _round_with(
    tmp_path: Path, bad: str | None
) -> tuple[ClientLevelFedAvg, ArrayRecord | None]:
    """One reproducible round on nodes 1-3 (q = 1); node 3 sends ``bad`` or nothing."""
    strategy = _strategy(tmp_path / str(bad), 3, client_sampling_rate=1.0,
                         reproducible_noise=True)  # fmt: skip
    messages = list(
        strategy.configure_train(1, _tiny_arrays(), ConfigRecord(), _Nodes([1, 2, 3]))
    )
    replies = [
        _update_reply(m, _small_update(m.metadata.dst_node_id)) for m in messages[:2]
    ]
    if bad == "weights":  # model weights where a client-level update belongs
        report = TrainReport.trained(3, 100, None, None)
        delivered = make_message(messages[2].content, messages[2].metadata.message_type, 3)
        replies.append(Message(report.to_content(_tiny_arrays()), reply_to=delivered))
    elif bad is not None:
        replies.append(_update_reply(messages[2], BAD_UPDATES[bad]))
    new_arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, new_arrays


@pytest.mark.parametrize("bad", [*BAD_UPDATES, "weights"])
def test_malformed_update_is_an_error_and_never_reaches_the_aggregate(
    tmp_path: Path, bad: str
) -> None:
    """NaN/inf, wrong shape, dtype or keys, or weights instead of an update: the node's
    outcome is an error naming why, and the model is what the two good nodes give."""
    strategy, got = _round_with(tmp_path, bad)
    reference, want = _round_with(tmp_path, None)
    by_node = {o.node_id: o for o in strategy.last_outcomes}
    assert by_node[3].status is Status.REJECTED
    assert "client-level update rejected" in str(by_node[3].reason)
    if bad == "over-norm":
        assert "> this round's clip norm 0.5" in str(by_node[3].reason)
    assert [by_node[n].status for n in (1, 2)] == [Status.TRAINED] * 2
    assert strategy.last_round is not None and strategy.last_round.cohort == 2
    assert got is not None and want is not None
    for key in TINY_MODEL:
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy())
        assert np.isfinite(got[key].numpy()).all()
    # The round still spent its budget: the ledger recorded it.
    assert strategy.ledger.ledger.rounds == (1,)


# == 6. adaptive clipping ===========================================================
def _adaptive_run(seed: int | None, rounds: int = 250) -> list[float]:
    """C over ``rounds`` rounds of 100 updates with lognormal norms (median 2)."""
    settings = _fixed(1.0, c=0.05, q=0.1, n=1000, clipping="adaptive",
                      clipped_count_stddev=5.0, target_quantile=0.5,
                      clip_learning_rate=0.2)  # fmt: skip
    aggregator = ClientLevelAggregator(settings)
    norms = np.random.default_rng(7).lognormal(math.log(2.0), 0.5, size=(rounds, 100))
    trajectory = []
    for r in range(rounds):
        updates = [([np.array([norm])], bool(norm <= aggregator.clip_norm))
                   for norm in norms[r]]  # fmt: skip
        generator = round_generator(None if seed is None else seed + r)
        trajectory.append(aggregator.aggregate([np.zeros(1)], updates, generator).clip_norm)
    return trajectory


def test_adaptive_clip_norm_converges_to_the_target_quantile() -> None:
    """From C = 0.05, C reaches the median of the update norms (2.0) within 10 %."""
    trajectory = _adaptive_run(seed=1)
    assert trajectory[0] == 0.05
    settled = math.exp(float(np.mean(np.log(trajectory[-60:]))))
    assert settled == pytest.approx(2.0, rel=0.1)


def test_adaptive_count_is_noised_and_the_accountant_sees_z(tmp_path: Path) -> None:
    """Same updates, OS entropy: different C paths (count noise); a replayed seed: equal."""
    assert _adaptive_run(None, 30) != _adaptive_run(None, 30)
    assert _adaptive_run(3, 30) == _adaptive_run(3, 30)
    strategy = _strategy(tmp_path, 400, clipping="adaptive", client_sampling_rate=0.25)
    block = strategy.summary_block()
    z = strategy.noise_multiplier
    assert block["noise_multiplier"] == z == 1.0
    assert block["update_noise_multiplier"] > z  # z_Δ: z with the count's share paid
    assert block["clipped_count_stddev"] == pytest.approx(400 * 0.25 / 20)
    messages = list(
        strategy.configure_train(1, _tiny_arrays(), ConfigRecord(), _Nodes(range(1, 401)))
    )
    strategy.aggregate_train(1, [_update_reply(m, _small_update(1)) for m in messages[:5]])
    assert strategy.ledger.ledger.history() == [(z, 0.25, 1)]  # z, not z_Δ


# == 7. budget and the ledger on disk ===============================================
def _grid(cfg: RunConfig, n: int) -> Any:
    return InProcessGrid(
        {
            node: make_context(cfg, partition_id=node - 1, num_partitions=n, node_id=node)
            for node in range(1, n + 1)
        }  # fmt: skip
    )


def _central(_arrays: ArrayRecord) -> dict[str, float]:
    return {"accuracy": 0.0, "loss": 0.0}  # central evaluation is not under test here


def test_budget_stops_before_the_round_that_would_exceed_it(tmp_path: Path) -> None:
    """Budget between ε(3 rounds) and ε(4 rounds): three rounds run, the 4th does not."""
    z, q = 1.0, 0.5
    eps3, eps4 = (epsilon_of_history([(z, q, r)], DELTA, "rdp") for r in (3, 4))
    cfg = _client_cfg(
        tmp_path, num_rounds=10, epsilon_budget=(eps3 + eps4) / 2, min_available_nodes=4
    )
    strategy = make_strategy(cfg, tmp_path / "results")
    writer = ResultsWriter(tmp_path / "results", cfg)
    initial = ArrayRecord(build_model("digits", seed=cfg.seed).state_dict())
    result = run_rounds(_grid(cfg, 4), cfg, strategy, initial, _central, writer, 0.0)
    assert result.rounds_completed == 3
    assert "client-level ε budget" in result.stop_reason and "round 4" in result.stop_reason

    rounds = [json.loads(line) for line in (tmp_path / "results/rounds.jsonl").open()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    on_disk = json.loads((tmp_path / "results" / LEDGER_FILE).read_text())
    history = on_disk["ledger"]["history"]
    assert history == [[z, q, 3]] and on_disk["ledger"]["rounds"] == [1, 2, 3]
    summary = summarise(cfg, result, 1.0, strategy)
    block = summary["client_level"]
    assert summary["stop_reason"] == result.stop_reason
    assert summary["status"] == "budget-exhausted"  # a clean stop, not a failure
    assert block["history"] == [(z, q, 3)] and block["epsilon"] == on_disk["epsilon"]
    for r, record in enumerate(rounds, start=1):
        assert record["privacy_unit"] == "client"
        _assert_matches_google(record["max_epsilon"], [(z, q, r)])
        level = record["client_level"]
        assert level["cohort_size"] == len(
            [c for c in record["clients"] if c["status"] == "trained"]
        )
    assert rounds[-1]["max_epsilon"] == block["epsilon"] <= cfg.epsilon_budget
    _assert_matches_google(block["epsilon"], history)
    assert "client-level ε" in epsilon_text(rounds[-1])


def test_ledger_is_on_disk_before_the_model_is_published(tmp_path: Path) -> None:
    """A crash while saving round 1's model: the ledger already holds round 1."""
    cfg = _client_cfg(tmp_path, num_rounds=2, client_sampling_rate=1.0)
    strategy = make_strategy(cfg, tmp_path / "results")
    writer = ResultsWriter(tmp_path / "results", cfg)

    def crash(_arrays: ArrayRecord) -> Path:
        raise OSError("disk gone while publishing the model")

    writer.save_model = crash  # type: ignore[method-assign]
    initial = ArrayRecord(build_model("digits", seed=cfg.seed).state_dict())
    with pytest.raises(OSError, match="disk gone"):
        run_rounds(_grid(cfg, 2), cfg, strategy, initial, _central, writer, 0.0)
    on_disk = json.loads((tmp_path / "results" / LEDGER_FILE).read_text())
    assert on_disk["ledger"]["rounds"] == [1]
    assert on_disk["ledger"]["history"] == [[1.0, 1.0, 1]]
    assert on_disk["epsilon"] == pytest.approx(_google_rdp([(1.0, 1.0, 1)]), rel=0.01)
    assert not (tmp_path / "results" / "model.pt").exists()


# == 8. randomness ==================================================================
def _one_round(
    tmp_path: Path, name: str, reproducible: bool, rate: float
) -> tuple[list[int], Any]:
    """Cohort and new model of round 1 over 64 nodes, every global RNG seeded alike."""
    random.seed(42)
    np.random.seed(42)
    torch.manual_seed(42)
    strategy = _strategy(
        tmp_path / name, 64, reproducible_noise=reproducible, client_sampling_rate=rate
    )
    grid = _Nodes(range(1, 65))
    messages = list(strategy.configure_train(1, _tiny_arrays(), ConfigRecord(), grid))
    replies = [_update_reply(m, _small_update(m.metadata.dst_node_id)) for m in messages]
    new, _ = strategy.aggregate_train(1, replies)
    assert new is not None
    return list(strategy.cohort), new["w"].numpy()


def test_dp_randomness_comes_from_os_entropy_not_the_run_config(tmp_path: Path) -> None:
    """Same seed, same inputs, every global RNG seeded the same: another cohort (q ½),
    and with everyone in the cohort (q 1) another noise. With reproducible-noise (the
    documented research mode, not private) both repeat."""
    cohort_a, _ = _one_round(tmp_path, "a", reproducible=False, rate=0.5)
    cohort_b, _ = _one_round(tmp_path, "b", reproducible=False, rate=0.5)
    assert cohort_a != cohort_b
    cohort_a, model_a = _one_round(tmp_path, "c", reproducible=False, rate=1.0)
    cohort_b, model_b = _one_round(tmp_path, "d", reproducible=False, rate=1.0)
    assert cohort_a == cohort_b and not np.array_equal(model_a, model_b)
    like, settings = [np.zeros(1000)], _fixed()
    first = ClientLevelAggregator(settings).aggregate(like, [], round_generator())
    second = ClientLevelAggregator(settings).aggregate(like, [], round_generator())
    assert not np.array_equal(first.mean_update[0], second.mean_update[0])

    cohort_c, model_c = _one_round(tmp_path, "e", reproducible=True, rate=0.5)
    cohort_d, model_d = _one_round(tmp_path, "f", reproducible=True, rate=0.5)
    assert cohort_c == cohort_d and np.array_equal(model_c, model_d)


# == 9. the node side ===============================================================
def _client_level_message(clip_norm: float) -> Message:
    message = train_message(ArrayRecord(build_model("digits", seed=0).state_dict()), 1)
    message.content["config"][CLIP_NORM_KEY] = clip_norm
    return message


@pytest.mark.parametrize("clip_norm", [0.05, 1e6])
def test_node_sends_a_clipped_update_and_records_a_release(
    tmp_path: Path, clip_norm: float
) -> None:
    """The reply: an update of norm ≤ C, the right bit, no weights or counts; the
    node's own record-level ledger says ε = ∞ for this round."""
    cfg = _client_cfg(tmp_path)
    reply = client_app.train(_client_level_message(clip_norm), make_context(cfg, 1, 4))
    report = TrainReport.from_content(reply.content)
    assert report.status is Status.TRAINED and report.client_level
    assert set(reply.content.array_records) == {UPDATE_KEY}
    assert report.planning_records is None and report.num_examples is None
    assert report.train_loss is None
    update = reply.content.array_records[UPDATE_KEY].to_numpy_ndarrays()
    norm = math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in update))
    assert 0 < norm <= clip_norm * (1 + 1e-6)
    assert report.below_clip is (clip_norm > 1)  # a digits round moves far more than 0.05
    if clip_norm < 1:
        assert norm == pytest.approx(clip_norm, rel=1e-5)
    ledger = report.ledger
    assert isinstance(ledger, PrivacyLedger) and ledger.released_without_dp
    assert ledger.rounds == (1,) and ledger.epsilon() == math.inf


@pytest.mark.parametrize("allowed", [False, True])
def test_device_policy_decides_whether_to_send_unnoised_updates(
    tmp_path: Path, allowed: bool
) -> None:
    """A deployed node without allow-client-level refuses, naming both keys."""
    cfg = _client_cfg(tmp_path)
    state = write_policy(
        tmp_path / "node", **({"allow-client-level": True} if allowed else {})
    )
    context = make_context(cfg, 0, 4)
    context.node_config["state-dir"] = str(state)
    report = TrainReport.from_content(
        client_app.train(_client_level_message(0.5), context).content
    )
    if allowed:
        assert report.status is Status.TRAINED and report.client_level
        return
    assert report.status is Status.POLICY_REFUSED
    assert "'privacy-mode'" in str(report.reason)
    assert "allow-client-level" in str(report.reason)


@pytest.mark.parametrize("allowed", [False, True])
def test_device_refuses_replayable_client_level_noise_unless_its_policy_allows_it(
    tmp_path: Path, allowed: bool
) -> None:
    """reproducible-noise makes the server's noise replayable from the public seed:
    anyone holding the run config could subtract it from the global model and read
    the exact sum of clipped updates (one client's, in a cohort of one). A device
    whose policy allows client-level DP but not reproducible noise refuses."""
    cfg = _client_cfg(tmp_path, reproducible_noise=True)
    keys: dict[str, Any] = {"allow-client-level": True}
    if allowed:
        keys["allow-reproducible-noise"] = True
    context = make_context(cfg, 0, 4)
    context.node_config["state-dir"] = str(write_policy(tmp_path / "node", **keys))
    report = TrainReport.from_content(
        client_app.train(_client_level_message(0.5), context).content
    )
    if allowed:
        assert report.status is Status.TRAINED and report.client_level
        return
    assert report.status is Status.POLICY_REFUSED
    assert "'reproducible-noise'" in str(report.reason)
    assert "allow-reproducible-noise" in str(report.reason)


def test_only_the_nodes_of_the_start_are_sampled(tmp_path: Path) -> None:
    """n and δ < 1/n were fixed for the nodes connected at the start: a node that
    joins later is never instructed (it waits for the next run)."""
    strategy = _strategy(tmp_path, 3, client_sampling_rate=1.0)
    messages = list(
        strategy.configure_train(1, _tiny_arrays(), ConfigRecord(), _Nodes([1, 2, 3, 99]))
    )
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]


def test_a_second_reply_or_one_from_outside_the_cohort_is_not_summed(
    tmp_path: Path,
) -> None:
    """One update per sampled node per round, whatever arrives (Flower's link state
    already refuses both; the strategy does not rely on it)."""
    strategy = _strategy(tmp_path, 3, client_sampling_rate=1.0, reproducible_noise=True)
    messages = list(
        strategy.configure_train(1, _tiny_arrays(), ConfigRecord(), _Nodes([1, 2]))
    )
    first = _update_reply(messages[0], _small_update(1))
    again = _update_reply(messages[0], _small_update(1))
    strategy.aggregate_train(1, [first, again])
    statuses = [o.status for o in strategy.last_outcomes]
    assert statuses == [Status.TRAINED, Status.REJECTED]
    assert strategy.last_round is not None and strategy.last_round.cohort == 1


def test_undecodable_update_bytes_are_an_error_not_a_crash(tmp_path: Path) -> None:
    """An update array whose bytes are not an array is rejected; the round goes on."""
    strategy = _strategy(tmp_path, 2, client_sampling_rate=1.0, reproducible_noise=True)
    messages = list(
        strategy.configure_train(1, _tiny_arrays(), ConfigRecord(), _Nodes([1, 2]))
    )
    good = _update_reply(messages[0], _small_update(1))
    bad = _update_reply(messages[1], _small_update(2))
    record = bad.content.array_records[UPDATE_KEY]
    name = next(iter(record.keys()))
    record[name] = Array(
        dtype=record[name].dtype, shape=record[name].shape, stype="numpy.ndarray",
        data=b"garbage",
    )  # fmt: skip
    new, _ = strategy.aggregate_train(1, [good, bad])
    assert new is not None
    outcome = strategy.last_outcomes[1]
    assert outcome.status is Status.REJECTED and "do not decode" in (outcome.reason or "")
