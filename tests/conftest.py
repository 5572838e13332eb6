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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end modules first, each module's tests kept together and in order.

    `make test` hands whole modules to two workers (pytest-xdist, ``--dist loadfile``)
    in this order; starting the longest modules first keeps the short ones for the end,
    where they fill in around the last long one instead of one worker waiting alone.
    """
    first_of: dict[object, int] = {}
    for index, item in enumerate(items):
        first_of.setdefault(item.path, index)
    e2e = {item.path for item in items if item.get_closest_marker("e2e") is not None}
    items.sort(key=lambda item: (item.path not in e2e, first_of[item.path]))
