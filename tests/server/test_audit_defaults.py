"""audit-canaries: a default that fits every built-in task, and a bad value refused
before any process starts (issue 28)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import simulations.run as run
from common.audit.canaries import AUTO_CANARIES, canary_count, canary_plan
from common.config import ConfigError, RunConfig
from common.data.datasets import load_dataset
from simulations.launch.options import pyproject_defaults
from simulations.launch.preflight import check_federation


def test_the_default_is_auto_in_the_config_and_in_pyproject() -> None:
    assert RunConfig().audit_canaries == AUTO_CANARIES == -1
    assert pyproject_defaults()["audit-canaries"] == AUTO_CANARIES


@pytest.mark.parametrize(
    ("requested", "pool", "expected"),
    [(-1, 1437, 718), (-1, 60_000, 1000), (-1, 2001, 1000), (-1, None, 1000),
     (300, 1437, 300), (5000, None, 5000)],
)  # fmt: skip
def test_auto_is_the_smaller_of_1000_and_half_the_pool(
    requested: int, pool: int | None, expected: int
) -> None:
    assert canary_count(requested, pool) == expected


def test_the_default_fits_the_digits_pool() -> None:
    """digits (1,437 training records) refused the old default of 1,000."""
    data = load_dataset("digits", "", 0)
    plan = canary_plan(0, AUTO_CANARIES, data.y_train, data.num_classes)
    assert len(plan.indices) == len(data.y_train) // 2 == 718
    with pytest.raises(ConfigError, match="'audit-canaries': must be <= 718"):
        canary_plan(0, 1000, data.y_train, data.num_classes)


@pytest.mark.parametrize("mode", ["none", "sample"])
def test_preflight_refuses_too_many_canaries_naming_the_key(mode: str) -> None:
    bad = RunConfig(audit="one-run", audit_canaries=1000, privacy_mode=mode)
    with pytest.raises(ConfigError, match="run config key 'audit-canaries'"):
        check_federation(bad, 2)
    check_federation(RunConfig(audit="one-run", privacy_mode=mode), 2)  # the default


class _Started(AssertionError):
    """The launcher went on to start processes after a bad key."""


def test_the_launcher_exits_2_before_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def tripwire(*_args: Any, **_kwargs: Any) -> None:
        raise _Started("a process was started")

    monkeypatch.setattr(run, "simulation_superlink", tripwire)
    monkeypatch.setattr(run, "become_subreaper", tripwire)
    argv = ["--clients", "2", "--rounds", "1", "--results-dir", str(tmp_path / "r"),
            "--set", 'audit="one-run"', "--set", "audit-canaries=1000"]  # fmt: skip
    assert run.main(argv) == 2
    assert "'audit-canaries'" in capsys.readouterr().err
