"""Each tabular preset, 2 of its rounds, through the real launcher and ServerApp.

One client per natural site (4 Census regions of Lending Club loans; the 2 Wilms
tumour trials), sample-level DP with σ calibrated per site for the preset's ε ≤ 1 over
its 10 rounds: after 2 rounds every site's cumulative ε is below 1 and names its
accountant, δ and unit, the central metrics are the binary ones, and every process
is gone afterwards. The full presets are benchmarks (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from simulations.presets import PRESETS
from tests.helpers.process_watch import assert_all_gone, run_watched


@pytest.mark.e2e
@pytest.mark.parametrize(("preset", "sites"), [("credit-eps1", 4), ("medical-eps1", 2)])
def test_a_tabular_preset_runs_two_rounds(tmp_path: Path, preset: str, sites: int) -> None:
    assert PRESETS[preset].clients == sites
    results = tmp_path / "run"
    code, out, watch = run_watched(
        ["--preset", preset, "--rounds", "2", "--results-dir", str(results)]
    )
    assert code == 0, out[-4000:]
    assert_all_gone(watch)
    rounds = [
        json.loads(line) for line in (results / "rounds.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["clients_trained"] == sites for r in rounds), rounds
    summary = json.loads((results / "summary.json").read_text())
    central = summary["final_central"]
    assert {"auroc", "auprc", "brier"} <= set(central), central
    assert 0.0 <= central["auroc"] <= 1.0 and math.isfinite(central["brier"])
    assert 0 < summary["max_epsilon"] < 1.0
    assert summary["accountant"] == "opacus-rdp" and summary["delta"] == 1e-5
    assert summary["privacy_unit"] == "record"
