"""The audit's self-test (issue 28): planted bugs in privfed's own mechanisms are
flagged, the unmodified code is not. A small configuration: 5,000 Dirac canaries,
2 releases, claimed ε 3 (opacus-rdp, δ 1e-5)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant

from simulations.audit import __main__ as cli
from simulations.audit.self_test import (
    CLIENT,
    CLIP,
    CORRECT,
    HALF_NOISE,
    MECHANISMS,
    NO_CLIPPING,
    REUSED_NOISE,
    SAMPLE,
    VARIANTS,
    SelfTestRow,
    SelfTestSetup,
    audit_variant,
    noise_multiplier,
    run_self_test,
)

SMALL = SelfTestSetup(canaries=5000, rounds=2)


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, str], SelfTestRow]:
    found = run_self_test(SMALL, (3.0,))
    return {(r.mechanism, r.variant): r for r in found}


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_the_correct_mechanism_is_not_flagged(
    rows: dict[tuple[str, str], SelfTestRow], mechanism: str
) -> None:
    row = rows[mechanism, CORRECT]
    print(f"{mechanism}: {row.bound.epsilon_lower_bound:.3f} vs {row.claimed_epsilon:.3f}")
    assert 2.99 < row.claimed_epsilon <= 3.0
    assert row.bound.epsilon_lower_bound <= row.claimed_epsilon
    assert row.gdp.mu_lower_bound <= row.claimed_mu
    assert row.verdict.startswith("pass")


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("variant", [NO_CLIPPING, REUSED_NOISE])
def test_planted_bugs_are_flagged(
    rows: dict[tuple[str, str], SelfTestRow], mechanism: str, variant: str
) -> None:
    row = rows[mechanism, variant]
    print(f"{mechanism}, {variant}: {row.bound.epsilon_lower_bound:.3f}")
    assert row.bound.epsilon_lower_bound > row.claimed_epsilon + 1
    assert row.gdp.mu_lower_bound > 2 * row.claimed_mu
    assert row.verdict.startswith("flagged")


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_halved_noise_is_flagged_by_the_f_dp_audit(
    rows: dict[tuple[str, str], SelfTestRow], mechanism: str
) -> None:
    """Halved noise doubles μ. The (ε, δ) bound (about 0.4·ε of a Gaussian mechanism)
    rises but stays below ε; the f-DP audit's μ_lb (about 0.6·μ) passes the claimed
    μ, and the Gaussian-fit estimate is about twice ε."""
    bug, correct = rows[mechanism, HALF_NOISE], rows[mechanism, CORRECT]
    print(f"{mechanism}: μ_lb {bug.gdp.mu_lower_bound:.3f} vs μ {bug.claimed_mu:.3f}; "
          f"estimate {bug.estimate:.2f} vs correct {correct.estimate:.2f}")  # fmt: skip
    assert bug.gdp.mu_lower_bound > bug.claimed_mu
    assert bug.estimate > 1.5 * bug.claimed_epsilon
    assert bug.verdict.startswith("flagged")


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_the_scores_are_the_gaussian_mechanism_the_accountant_sees(mechanism: str) -> None:
    """Independent check of what the self-test measures: excluded canaries score
    N(0, T·s²) and included ones N(T·C/N', T·s²), where the noise std s and the
    divisor N' (records, or canary clients) follow from σ; so the score SNR is
    √T/σ, whose ε by dp-accounting's PLD is the claimed ε within the accountant's
    slack (RDP is at most ~10 % above PLD here). At ε 8, where √T/σ ≈ 1.6."""
    row = audit_variant(mechanism, CORRECT, 8.0, SMALL)
    inside, outside = row.scores[row.included], row.scores[~row.included]
    snr = (inside.mean() - outside.mean()) / outside.std(ddof=1)
    expected = math.sqrt(SMALL.rounds) / row.noise_multiplier
    assert snr == pytest.approx(expected, rel=0.1)
    assert inside.std(ddof=1) == pytest.approx(outside.std(ddof=1), rel=0.15)
    pld = PLDAccountant()
    pld.compose(dp_event.GaussianDpEvent(row.noise_multiplier), SMALL.rounds)
    exact = pld.get_epsilon(SMALL.delta)
    assert exact <= row.claimed_epsilon <= 1.15 * exact
    assert CLIP == 1.0


def test_the_bugs_are_undone_after_the_audit() -> None:
    """The wrappers only live inside the audit: the code is intact afterwards."""
    sigma_eps = noise_multiplier(SMALL, 1.0)
    small = SelfTestSetup(canaries=200, rounds=2)
    for variant in VARIANTS:
        audit_variant(SAMPLE, variant, 1.0, small, sigma_eps)
        audit_variant(CLIENT, variant, 1.0, small, sigma_eps)
    after = audit_variant(CLIENT, CORRECT, 1.0, small, sigma_eps)
    spread = float(np.std(after.scores[~after.included]))
    assert spread > 0  # noise is drawn again (a leftover "reused" wrapper would cancel)


def test_the_command_writes_the_table_and_plots(tmp_path: Path) -> None:
    code = cli.main(
        ["--self-test", "--canaries", "300", "--epsilons", "1", "--mechanisms", "client",
         "--out", str(tmp_path)]
    )  # fmt: skip
    table = (tmp_path / "self-test-table.md").read_text()
    # 300 canaries may miss a bug at ε 1; the exit code must say so whenever it does
    assert code == (1 if "MISSED" in table or "missed" in table else 0), table
    assert "FALSE ALARM" not in table
    assert table.count("\n") == 2 + len(VARIANTS)
    assert "(opacus-rdp, δ=1e-05, per client)" in table and "| correct |" in table
    for png in ("self-test-vs-epsilon.png", "self-test-scores.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["--self-test", "--rounds", "3", "--out", str(tmp_path)]) == 2
