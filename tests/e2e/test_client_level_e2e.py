"""End to end: the client-level preset's mechanism on a real 50-client simulation.

The preset itself (10,000 Fashion-MNIST clients) is measured by
``simulations.bench.client_level``; here its run keys run on digits with pixel
features (ScatterNet features of Fashion-MNIST for central evaluation alone cost a
minute on 2 cores) so that 50 clients fit a test: the same launcher, preset
machinery, mechanism and results.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers.independent_accounting import dp_accounting_rdp
from tests.helpers.process_watch import assert_all_gone, run_watched

pytestmark = pytest.mark.e2e


def test_client_level_preset_on_50_clients(tmp_path: Path) -> None:
    """`--preset fmnist-client-eps3` on 50 digits clients: ledger, records, summary, ε."""
    results = tmp_path / "run"
    code, out, watch = run_watched(
        [
            "--preset",
            "fmnist-client-eps3",
            "--task",
            "digits",
            "--set",
            'features="pixels"',
            "--clients",
            "50",
            "--rounds",
            "3",
            "--set",
            "client-sampling-rate=0.1",
            "--set",
            'clipping="adaptive"',
            "--set",
            "clipped-count-stddev=1.0",
            "--results-dir",
            str(results),
        ]  # fmt: skip
    )
    assert code == 0, out[-4000:]
    assert "cumulative client-level ε" in out and "per client" in out
    rounds = [json.loads(x) for x in (results / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((results / "summary.json").read_text())
    ledger = json.loads((results / "federation-ledger.json").read_text())
    block = summary["client_level"]

    assert summary["status"] == "completed" and summary["privacy_unit"] == "client"
    assert block["population"] == 50 and block["expected_cohort"] == pytest.approx(5.0)
    assert block["clipping"] == "adaptive" and block["rounds"] == 3
    assert block["history"] == [[block["noise_multiplier"], 0.1, 3]]
    assert block["update_noise_multiplier"] > block["noise_multiplier"]
    # Every reported ε equals dp-accounting's on the logged history (within 1 %).
    independent = dp_accounting_rdp(block["history"], block["delta"])
    assert block["epsilon"] == pytest.approx(independent, rel=0.01)
    assert summary["max_epsilon"] == block["epsilon"] == ledger["epsilon"]
    assert block["epsilon"] <= 3.0  # the preset's target, z calibrated for 3 rounds
    assert ledger["ledger"]["history"] == block["history"]

    previous = 0.0
    for record in rounds:
        level = record["client_level"]
        assert record["privacy_unit"] == "client" and record["delta"] == 1e-5
        assert level["cohort_size"] == record["clients_trained"] + (
            record["clients_refused"] + record["clients_failed"]
        )
        assert record["max_epsilon"] > previous
        previous = record["max_epsilon"]
        # The clip norm the next round uses is the one this round adapted to.
        assert level["next_clip_norm"] > 0 and math.isfinite(level["next_clip_norm"])
        for client in record["clients"]:
            assert client["aggregation_weight"] is None  # equal weights
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[1]["client_level"]["clip_norm"] == pytest.approx(
        rounds[0]["client_level"]["next_clip_norm"]
    )
    assert block["final_clip_norm"] == pytest.approx(
        rounds[-1]["client_level"]["next_clip_norm"]
    )
    assert (results / "epsilon.png").read_bytes()[:4] == b"\x89PNG"
    assert_all_gone(watch)
