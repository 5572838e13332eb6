"""Secure aggregation played in one process: a round of real ClientApps over an
in-process grid, the trusted dealer of their identities, and the attacker's tools."""

from __future__ import annotations

import random
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import client.secure_aggregation.stages as secagg_client
from common.config import RunConfig
from common.secure_aggregation.distributed_dp import QuantisationPlan, plan_skellam_round
from common.secure_aggregation.identity import DEALER_ENV
from common.secure_aggregation.plan import public_minimum
from common.secure_aggregation.protocol import SECAGG_KEY, Stage
from common.tasks.models import build_model, count_parameters
from server.results.client_outcomes import outcome_from_reply
from server.secure_aggregation.round import SecAggRound, round_layout
from simulations.deployment.node_identity import deal_identities
from simulations.launch.in_process_federation import InProcessGrid, delivered, federation

NODES = 5
FIRST = 100  # node ids are FIRST + partition


def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Server-side messages need the task identity a ServerApp process has."""
    for key, value in {"_run_id": 7, "_node_id": 1, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, key, value)


def secagg_cfg(tmp_path: Path, **changes: Any) -> RunConfig:
    """A five-node client-level run under secure aggregation, q = 1, m = 3 of 5."""
    values: dict[str, Any] = dict(
        privacy_mode="client", secure_aggregation=True, client_sampling_rate=1.0,
        target_epsilon=0.0, noise_multiplier=1.0, delta=1e-3, num_rounds=2,
        min_available_nodes=NODES, min_train_nodes=2, secagg_min_contributors=0.6,
        results_dir=str(tmp_path / "run"), secagg_timeout=0.3,
    )  # fmt: skip
    values.update(changes)
    return RunConfig(**values)


class Recorder:
    """Each client's noised, quantised vector before masking, by node."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.values: dict[int, np.ndarray] = {}
        self.current = 0
        encode, upload = QuantisationPlan.encode, secagg_client.masked_upload

        def recording_encode(plan: QuantisationPlan, *args: Any) -> np.ndarray:
            out = encode(plan, *args)
            self.values[self.current] = out
            return out

        def recording_upload(context: Any, held: Any, change: Any) -> ArrayRecord:
            self.current = held.node_id
            return upload(context, held, change)

        monkeypatch.setattr(QuantisationPlan, "encode", recording_encode)
        monkeypatch.setattr(secagg_client, "masked_upload", recording_upload)


class Protocol:
    """One round of the protocol over an in-process grid of real ClientApps (which
    answers as it is pushed to, so a lost node costs only the short timeouts)."""

    def __init__(
        self, cfg: RunConfig, lost: set[tuple[int, str]] | None = None, nodes: int = NODES
    ) -> None:
        self.cfg = cfg
        self.server_round = 1
        self.contexts = federation(cfg, range(nodes), nodes, first_node=FIRST)
        self.sent: list[tuple[int, str]] = []
        lost = lost or set()

        def unreachable(node: int, message_type: str) -> bool:
            self.sent.append((node, message_type))
            return (node, message_type) in lost

        self.grid = InProcessGrid(self.contexts, lost=unreachable)
        self.layout = round_layout(
            list(self.contexts), cfg, random.Random(0), public_minimum(cfg, nodes)
        )
        self.dim = count_parameters(build_model(cfg.task))
        self.plan = plan_skellam_round(
            self.dim, 1.0, 1.0, nodes, self.layout.min_contributors, 16
        )
        self.seed = secrets.token_bytes(32)
        self.arrays = ArrayRecord(build_model(cfg.task, seed=0).state_dict())

    def content(self, node: int) -> RecordDict:
        """The masked-update instruction's model and config."""
        config = ConfigRecord({"server-round": self.server_round, "clip-norm": 1.0})
        return RecordDict({"arrays": self.arrays, "config": config})

    def run(self, protocol_class: type[SecAggRound] = SecAggRound) -> Any:
        """One round with ``protocol_class`` playing the server."""
        protocol = protocol_class(
            self.grid,
            self.server_round,
            self.layout,
            self.plan,
            self.seed,
            0.3,
            0.3,
            time.monotonic,
        )
        return protocol.run(self.content, admit=outcome_from_reply)


def plain_sum(values: list[np.ndarray], plan: QuantisationPlan) -> np.ndarray:
    total = np.zeros(plan.padded_dim, dtype=np.uint64)
    for v in values:
        total = (total + v) % np.uint64(plan.modulus)
    return total


def use_dealer(tmp: Path, monkeypatch: pytest.MonkeyPatch, partitions: int = NODES) -> Path:
    """The trusted dealer a simulation launcher is: a CA and one certified identity
    per partition, handed to the ClientApps through the environment."""
    folder = deal_identities(tmp / "dealer", partitions)
    monkeypatch.setenv(DEALER_ENV, str(folder))
    return folder


class Stop(Exception):
    """Raised by a protocol subclass to stop a round at a stage."""


def ask(protocol: Protocol, node: int, stage: Stage, record: ConfigRecord) -> Message:
    """Deliver one stage instruction to ``node``'s ClientApp; its reply."""
    import client.app as client_app

    msg = delivered(RecordDict({SECAGG_KEY: record}), stage.message_type, node)
    return client_app.app(msg, protocol.contexts[node])


def run_to_upload(protocol: Protocol) -> None:
    """Run setup, share keys and masked update; every node waits for consistency."""

    class StopBeforeConsistency(SecAggRound):
        def _consistency(self, view: Any, uploaded: tuple[int, ...]) -> dict[int, bytes]:
            raise Stop

    with pytest.raises(Stop):
        protocol.run(StopBeforeConsistency)


def run_to_signed(protocol: Protocol) -> dict[int, bytes]:
    """Run the stages up to consistency; every node signed U (all of them) and waits
    to unmask. Returns the signatures by signer."""
    captured: dict[int, bytes] = {}

    class StopBeforeUnmask(SecAggRound):
        def _unmask(self, uploaded: tuple[int, ...], signatures: dict[int, bytes]) -> Any:
            captured.update(signatures)
            raise Stop

    with pytest.raises(Stop):
        protocol.run(StopBeforeUnmask)
    return captured
