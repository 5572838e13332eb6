"""The privacy ledger composes like one long Opacus run and round-trips as JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

from common.ledger.privacy_ledger import LedgerError, PrivacyLedger, epsilon_of_history
from common.privacy.dp_sgd_plan import (
    calibrate_gaussian_noise_multiplier,
    plan_dp_sgd_round,
)

Q = 1 / 19
DELTA = 1e-5


def _ten_rounds(accountant: str = "rdp") -> PrivacyLedger:
    ledger = PrivacyLedger(accountant, DELTA)
    for server_round in range(1, 11):
        ledger = ledger.extended(server_round, 1.0, Q, 19)
    return ledger


def test_ten_rounds_compose_like_one_190_step_run() -> None:
    """10 rounds x 19 steps (σ=1, q=1/19) = one 190-step run: ε 5.53 under Opacus RDP."""
    ledger = _ten_rounds()
    single = PrivacyLedger("rdp", DELTA).extended(1, 1.0, Q, 190)
    assert ledger.epsilon() == pytest.approx(single.epsilon(), rel=1e-12)
    assert ledger.epsilon() == pytest.approx(5.53, abs=0.01)
    stepped = RDPAccountant()  # independent: Opacus stepped 190 times
    for _ in range(190):
        stepped.step(noise_multiplier=1.0, sample_rate=Q)
    assert ledger.epsilon() == pytest.approx(stepped.get_epsilon(delta=DELTA), rel=1e-9)


def test_fresh_accountant_per_round_would_be_wrong() -> None:
    """The per-round ε (2.54) is what the bug reports; the ledger reports far more."""
    one_round = PrivacyLedger("rdp", DELTA).extended(1, 1.0, Q, 19).epsilon()
    assert one_round == pytest.approx(2.54, abs=0.02)
    assert _ten_rounds().epsilon() > 2 * one_round


def test_json_round_trip() -> None:
    """to_json/from_json and to_dict/from_dict (after json) restore the same ledger."""
    ledger = _ten_rounds().extended(11, 1.3, 0.05, 7, run_id=2)
    assert PrivacyLedger.from_json(ledger.to_json()) == ledger
    through_json = json.loads(json.dumps(ledger.to_dict()))
    restored = PrivacyLedger.from_dict(through_json)
    assert restored == ledger
    assert restored.epsilon() == ledger.epsilon()
    assert restored.history() == [(1.0, Q, 190), (1.3, 0.05, 7)]


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"format": "something-else"}',
        '{"format": "privfed-ledger/1", "accountant": "rdp", "delta": 1e-5}',
        '{"format": "privfed-ledger/1", "accountant": "rdp", "delta": 1e-5, '
        '"history": [[1.0, 0.1, -3]], "rounds": [1]}',
        '{"format": "privfed-ledger/1", "accountant": "rdp", "delta": 1e-5, '
        '"history": [[1.0, 1.5, 3]], "rounds": [1]}',
        '{"format": "privfed-ledger/1", "accountant": "gdp", "delta": 1e-5, '
        '"history": [], "rounds": []}',
        '{"format": "privfed-ledger/1", "accountant": "rdp", "delta": 1e-5, '
        '"history": [[1.0, 0.1, 190.9]], "rounds": [1]}',
        '{"format": "privfed-ledger/1", "accountant": "rdp", "delta": 1e-5, '
        '"history": [[1.0, 0.1, true]], "rounds": [1]}',
    ],
)
def test_malformed_ledgers_raise(text: str) -> None:
    """Anything malformed is a LedgerError, never an empty ledger."""
    with pytest.raises(LedgerError):
        PrivacyLedger.from_json(text)


def test_rounds_must_increase_within_a_run() -> None:
    """A round is recorded once; a new run may start again at round 1."""
    ledger = PrivacyLedger("rdp", DELTA).extended(3, 1.0, Q, 19, run_id=1)
    with pytest.raises(LedgerError):
        ledger.extended(3, 1.0, Q, 19, run_id=1)
    assert ledger.extended(1, 1.0, Q, 19, run_id=2).runs == (1, 2)


def test_equal_sigma_and_rate_merge_others_append() -> None:
    """History merges like Opacus' accountant.step does."""
    ledger = PrivacyLedger("rdp", DELTA).extended(1, 1.0, Q, 5).extended(2, 1.0, Q, 5)
    assert ledger.history() == [(1.0, Q, 10)]
    ledger = ledger.extended(3, 2.0, Q, 5)
    assert ledger.history() == [(1.0, Q, 10), (2.0, Q, 5)]
    assert ledger.total_steps == 15


def test_prv_is_available_and_tighter_here() -> None:
    """PRV gives a finite ε below RDP's for the same history."""
    rdp = _ten_rounds("rdp").epsilon()
    prv = _ten_rounds("prv").epsilon()
    assert 0 < prv < rdp
    reference = PRVAccountant()
    reference.history = [(1.0, Q, 190)]
    assert prv == pytest.approx(reference.get_epsilon(delta=DELTA), rel=1e-6)


def test_epsilon_after_is_a_dry_run() -> None:
    """epsilon_after equals extending and does not change the ledger."""
    ledger = _ten_rounds()
    assert ledger.epsilon_after(1.0, Q, 19) == pytest.approx(
        ledger.extended(11, 1.0, Q, 19).epsilon()
    )
    assert ledger.total_steps == 190
    assert epsilon_of_history([], DELTA, "rdp") == 0.0


@pytest.mark.parametrize(
    ("n", "batch"), [(130, 32), (647, 32), (6000, 256), (10, 64), (27000, 32)]
)
def test_round_plan_matches_opacus(n: int, batch: int) -> None:
    """Sampler rate, accounted rate and steps are exactly what Opacus uses and records."""
    data = TensorDataset(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long))
    loader = DataLoader(data, batch_size=batch)
    model = torch.nn.Linear(1, 2)
    engine = PrivacyEngine(accountant="rdp")
    dp_model, optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    plan = plan_dp_sgd_round(n, batch, local_epochs=1)
    assert plan.sampler_rate == dp_loader.sample_rate
    assert plan.steps == len(dp_loader)
    for xb, yb in dp_loader:  # one epoch, to see what the accountant records
        optimizer.zero_grad()
        if len(xb):
            torch.nn.functional.cross_entropy(dp_model(xb), yb).backward()
        optimizer.step()
    assert engine.accountant.history == [(1.0, plan.sample_rate, plan.steps)]


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibrated_sigma_meets_target_within_one_percent(target: float) -> None:
    """The calibrated σ lands ε in [0.99 target, target] over all planned steps."""
    plan = plan_dp_sgd_round(600, 32, 1)
    steps = 10 * plan.steps
    sigma = calibrate_gaussian_noise_multiplier(
        target, DELTA, plan.sample_rate, steps, "rdp"
    )
    eps = PrivacyLedger("rdp", DELTA).extended(1, sigma, plan.sample_rate, steps).epsilon()
    assert 0.99 * target <= eps <= target


def _random_histories(count: int, seed: int = 0) -> list[list[tuple[float, float, int]]]:
    rng = np.random.default_rng(seed)
    histories = []
    for _ in range(count):
        length = int(rng.integers(1, 12))
        sigmas = rng.choice([0.5, 0.8, 1.0, 1.7, 3.0], size=length)
        rates = rng.choice([1 / 19, 0.01, 0.2, 1 / 843, 1.0], size=length)
        steps = rng.integers(1, 500, size=length)
        histories.append(
            [
                (float(s), float(q), int(n))
                for s, q, n in zip(sigmas, rates, steps, strict=True)
            ]
        )
    return histories


def test_fast_rdp_equals_opacus_full_recomputation() -> None:
    """The cached per-order RDP path gives exactly Opacus' RDPAccountant ε."""
    for history in _random_histories(12):
        reference = RDPAccountant()
        reference.history = list(history)
        expected = reference.get_epsilon(delta=DELTA)
        assert epsilon_of_history(history, DELTA, "rdp") == pytest.approx(
            expected, rel=1e-9
        )


def test_fast_prv_equals_opacus() -> None:
    """The cached PRV path gives Opacus' PRVAccountant ε (and again from the cache)."""
    history = [(1.0, 0.05, 100), (1.2, 0.05, 50)]
    reference = PRVAccountant()
    reference.history = list(history)
    expected = reference.get_epsilon(delta=DELTA)
    assert epsilon_of_history(history, DELTA, "prv") == pytest.approx(expected, rel=1e-9)
    assert epsilon_of_history(list(history), DELTA, "prv") == pytest.approx(
        expected, rel=1e-9
    )
