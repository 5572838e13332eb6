"""Shared test fixtures: Flower messages and contexts without a running federation."""

from __future__ import annotations

import os
import signal

import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)

from common.config import RunConfig
from simulations.deployment.certificates import CA_DIR_ENV
from simulations.launch.in_process_federation import delivered

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def _terminate(signum: int, _frame: object) -> None:
    # Turn SIGTERM into an interrupt so fixtures still stop the processes they started.
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _terminate)


def make_message(content: RecordDict, message_type: str, dst_node_id: int = 5) -> Message:
    """A server-to-client instruction message, as a SuperNode would deliver it."""
    return delivered(content, message_type, dst_node_id)


def train_message(arrays: ArrayRecord, server_round: int, node_id: int = 5) -> Message:
    """A training instruction carrying global weights and the server round."""
    content = RecordDict(
        {"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}
    )
    return make_message(content, MessageType.TRAIN, node_id)


def evaluate_message(arrays: ArrayRecord, server_round: int, node_id: int = 5) -> Message:
    """An evaluation instruction carrying global weights."""
    content = RecordDict(
        {"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}
    )
    return make_message(content, MessageType.EVALUATE, node_id)


def make_context(
    cfg: RunConfig, partition_id: int = 0, num_partitions: int = 10, node_id: int = 5
) -> Context:
    """A simulation-style context for one node."""
    return Context(
        run_id=1,
        node_id=node_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=cfg.to_run_config(),
    )


@pytest.fixture
def digits_cfg() -> RunConfig:
    """A small private digits config."""
    return RunConfig(num_rounds=3, target_epsilon=8.0)


@pytest.fixture(autouse=True, scope="session")
def _private_ca_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test (and every script it starts) keeps its CA in a temporary folder,
    never in the real ~/.local/share/privfed/ca."""
    os.environ[CA_DIR_ENV] = str(tmp_path_factory.mktemp("privfed-ca") / "ca")
