"""Remembered σ calibrations: the same σ as Opacus, and no entry can lower the noise.

The attacker here can write the cache folder (another user's process, a planted or
stale file): the most they may cost is utility, never ε above the target.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from common.privacy.accountants import rdp
from common.privacy.calibration_cache import CACHE_ENV, FOLDER
from common.privacy.dp_sgd_plan import calibrate_gaussian_noise_multiplier

# q 1/10: a calibration bisects in 0.4 s (1 s at q 1/3: the same code, slower series)
TARGET, DELTA, RATE, STEPS = 3.0, 1e-5, 1 / 10, 30


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    return tmp_path / FOLDER


def _calibrate() -> float:
    return calibrate_gaussian_noise_multiplier(TARGET, DELTA, RATE, STEPS, "rdp")


def _epsilon(sigma: float) -> float:
    return rdp.epsilon(((sigma, RATE, STEPS),), DELTA)


def _opacus_sigma() -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=TARGET, target_delta=DELTA, sample_rate=RATE, steps=STEPS,
            accountant="rdp", epsilon_tolerance=min(0.01, 0.002 * TARGET),
        )
    )  # fmt: skip


def _only_entry(cache: Path) -> Path:
    entries = list(cache.glob("*.json"))
    assert len(entries) == 1, entries
    return entries[0]


def test_a_calibration_is_remembered_and_equals_opacus(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _calibrate()
    assert first == _opacus_sigma()
    entry = _only_entry(cache)
    assert json.loads(entry.read_text())["sigma"] == first
    assert entry.stat().st_mode & 0o777 == 0o600
    # Remembered: the bisection does not run again, the same σ comes back.
    with monkeypatch.context() as patched:
        patched.setattr(rdp, "noise_multiplier", _must_not_calibrate)
        assert _calibrate() == first
    # Other settings are another calibration.
    calibrate_gaussian_noise_multiplier(TARGET, DELTA / 10, RATE, STEPS, "rdp")
    assert len(list(cache.glob("*.json"))) == 2


def _must_not_calibrate(*args: object) -> float:
    raise AssertionError("calibrated again although the σ was remembered")


def test_a_planted_smaller_sigma_is_refused_and_replaced(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    honest = _calibrate()
    entry = _only_entry(cache)
    planted = json.loads(entry.read_text())
    planted["sigma"] = honest / 2  # half the noise: ε far above the target
    entry.write_text(json.dumps(planted))
    assert _epsilon(honest / 2) > TARGET
    with caplog.at_level(logging.WARNING):
        assert _calibrate() == honest
    assert "gives ε above the target" in caplog.text
    assert json.loads(entry.read_text())["sigma"] == honest


def test_a_larger_sigma_costs_utility_not_privacy(cache: Path) -> None:
    honest = _calibrate()
    entry = _only_entry(cache)
    planted = json.loads(entry.read_text())
    planted["sigma"] = honest * 2
    entry.write_text(json.dumps(planted))
    used = _calibrate()
    assert used == honest * 2 and _epsilon(used) <= TARGET


@pytest.mark.parametrize(
    "damage",
    ["{not json", '{"sigma": -1.0}', "[]", '{"key": {}, "sigma": 1.0}'],
)
def test_a_damaged_or_foreign_entry_is_replaced(
    cache: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    honest = _calibrate()
    entry = _only_entry(cache)
    entry.write_text(damage)
    with caplog.at_level(logging.WARNING):
        assert _calibrate() == honest
    assert "unusable" in caplog.text and str(entry) in caplog.text
    assert json.loads(entry.read_text())["sigma"] == honest


def test_an_unwritable_folder_costs_time_not_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker))  # FOLDER cannot be made under a file
    with caplog.at_level(logging.WARNING):
        assert _calibrate() == _opacus_sigma()
    assert "cannot remember σ calibrations" in caplog.text and CACHE_ENV in caplog.text
