"""End to end: client-level DP under secure aggregation on real Flower processes.

A 20-client simulation and the TLS deployment with 3 SuperNodes: the protocol's
four stages as real messages, the federation ledger of Skellam releases with ε
recomputed here, the summary block, and every process gone afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.privacy.ledger_store import LEDGER_FILE
from client.privacy.policy import POLICY_FILE, PrivacyPolicy
from common.ledger.privacy_ledger import PrivacyLedger
from common.secure_aggregation.skellam_accounting import SkellamRound, composed_epsilon
from tests.helpers.process_watch import (
    Watch,
    assert_all_gone,
    assert_loopback_only,
    run_watched,
)
from tests.helpers.runs_ahead import RunsAhead, runs_ahead

pytestmark = pytest.mark.e2e

DIGITS_FLOAT32_BYTES = 4810 * 4  # the digits MLP's update as float32


def _read(results: Path) -> tuple[list[dict], dict, dict]:
    rounds = [json.loads(x) for x in (results / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((results / "summary.json").read_text())
    ledger = json.loads((results / "federation-ledger.json").read_text())
    return rounds, summary, ledger


def _check_accounting(rounds: list[dict], summary: dict, ledger: dict) -> None:
    """Every ε is the Skellam accountant's on the recorded releases; the records and
    the summary agree with the ledger file."""
    releases = [SkellamRound.from_dict(r) for r in ledger["rounds"]]
    assert ledger["epsilon"] == pytest.approx(composed_epsilon(releases, ledger["delta"]))
    block = summary["client_level"]
    assert summary["privacy_unit"] == "client" and block["accountant"] == "skellam-rdp"
    assert summary["max_epsilon"] == block["epsilon"] == ledger["epsilon"]
    assert (
        "skellam-rdp" in summary["epsilon_text"] and "per client" in summary["epsilon_text"]
    )
    facts = block["secure_aggregation"]
    assert facts["rounds_unmasked"] == len(ledger["rounds"])
    assert facts["epsilon_against_server"] >= max(
        r["epsilon_round_alone"] for r in ledger["rounds"]
    )
    for record, entry in zip(rounds, ledger["rounds"], strict=True):
        sa = record["client_level"]["secure_aggregation"]
        assert sa["unmasked"] and sa["contributors"] == entry["contributors"]
        assert sa["contributors"] == record["clients_trained"]
        assert entry["modulus_bits"] == 16 and entry["modular_clipping_probability"] <= 1e-6
        assert record["max_epsilon"] == pytest.approx(entry["epsilon"])
        # quantised to 16 bits: the masked upload and the protocol stay under 1.5× float32
        assert sa["bytes_up_per_client_median"] <= 1.5 * DIGITS_FLOAT32_BYTES


def test_secure_aggregation_simulation_20_clients(tmp_path: Path) -> None:
    """Poisson cohorts at q = 0.8 of 20 (expected 16, above k = 15: SecAgg+'s sparse
    ring); m = max(t, ⌈0.5·16⌉) = 9 is fixed for the run, so a round falls short only
    with probability P(Binomial(20, 0.8) < 9) ≈ 1e-4."""
    results = tmp_path / "run"
    code, out, watch = run_watched(
        [
            "--clients", "20", "--rounds", "2", "--privacy-mode", "client",
            "--target-epsilon", "8", "--set", "secure-aggregation=true",
            "--set", "client-sampling-rate=0.8", "--set", "secagg-min-contributors=0.5",
            "--results-dir", str(results),
        ]
    )  # fmt: skip
    assert code == 0, out[-4000:]
    assert "under secure aggregation" in out and "at least m = 9 uploads" in out
    rounds, summary, ledger = _read(results)
    assert summary["status"] == "completed" and len(rounds) == 2
    _check_accounting(rounds, summary, ledger)
    assert ledger["epsilon"] <= 8.0  # z calibrated with the Skellam accountant
    assert "Skellam" in summary["noise"] and "OS entropy" in summary["noise"]
    assert_loopback_only(watch)
    assert_all_gone(watch)


def _tls_deployment_run(folder: Path) -> tuple[int, str, Watch, Path]:
    results = folder / "run"
    code, out, watch = run_watched(
        [
            "--clients", "3", "--rounds", "2", "--privacy-mode", "client",
            "--target-epsilon", "8", "--set", "secure-aggregation=true",
            "--set", "client-sampling-rate=1.0", "--results-dir", str(results),
        ],
        module="simulations.deploy",
    )  # fmt: skip
    return code, out, watch, results


@pytest.fixture(scope="module", autouse=True)
def ahead(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunsAhead]:
    """The deployment (10 protocol stages of 3 ClientApp processes) starts with the
    module, beside the simulation."""
    runs = {"test_secure_aggregation_tls_deployment_three_supernodes": _tls_deployment_run}
    with runs_ahead(request, tmp_path_factory, runs) as started:
        yield started


def test_secure_aggregation_tls_deployment_three_supernodes(
    ahead: RunsAhead, tmp_path: Path
) -> None:
    """TLS + SuperNode auth, 3 SuperNodes, q = 1: every round sums all three uploads;
    each node's own record-level ledger records the rounds as releases without
    record-level DP (its client-level ε is the federation's)."""
    code, out, watch, results = ahead.result(
        "test_secure_aggregation_tls_deployment_three_supernodes",
        _tls_deployment_run,
        tmp_path,
    )
    assert code == 0, out[-4000:]
    assert "TLS + SuperNode authentication" in out
    rounds, summary, ledger = _read(results)
    assert summary["status"] == "completed"
    assert [r["contributors"] for r in ledger["rounds"]] == [3, 3]
    _check_accounting(rounds, summary, ledger)
    for node in range(3):
        state = results / "nodes" / f"node-{node}"
        policy = PrivacyPolicy.from_file(state / POLICY_FILE)
        assert policy.allow_secure_aggregation and not policy.allow_client_level
        own = PrivacyLedger.from_json((state / LEDGER_FILE).read_text())
        assert own.rounds == (1, 2) and own.epsilon() == float("inf")
    assert_loopback_only(watch)
    assert_all_gone(watch)
