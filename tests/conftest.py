"""Shared test fixtures: Flower messages and contexts without a running federation."""

from __future__ import annotations

import os
import signal

import pytest

from common.config import RunConfig
from common.privacy.calibration_cache import CACHE_ENV as CALIBRATION_CACHE_ENV
from simulations.deployment.certificates import CA_DIR_ENV

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def _terminate(signum: int, _frame: object) -> None:
    # Turn SIGTERM into an interrupt so fixtures still stop the processes they started.
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _terminate)


@pytest.fixture
def digits_cfg() -> RunConfig:
    """A small private digits config."""
    return RunConfig(num_rounds=3, target_epsilon=8.0)


@pytest.fixture(autouse=True, scope="session")
def _session_calibration_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """σ calibrations are remembered for the session (every script it starts
    inherits the folder), never in the user's own cache."""
    os.environ[CALIBRATION_CACHE_ENV] = str(tmp_path_factory.mktemp("privfed-cache"))


@pytest.fixture(autouse=True, scope="session")
def _private_ca_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test (and every script it starts) keeps its CA in a temporary folder,
    never in the real ~/.local/share/privfed/ca."""
    os.environ[CA_DIR_ENV] = str(tmp_path_factory.mktemp("privfed-ca") / "ca")
