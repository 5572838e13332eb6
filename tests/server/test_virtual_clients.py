"""Virtual clients: many clients behind one simulated SuperNode change only the transport.

A run whose SuperNodes host the clients between them (``virtual-clients``) must
give exactly what one SuperNode per client gives: the same cohorts, the same
model bytes, the same ledgers (reproducible noise makes both runs comparable
draw for draw). A server that sends a SuperNode a partition it does not host,
and a device asked to act as many clients, are refused with nothing trained.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import client.app as client_app
from common.config import RunConfig
from common.tasks.models import build_model
from common.wire.virtual_group import (
    DISCOVERY_TYPE,
    HOSTED_KEY,
    Entry,
    group_type,
    pack,
    unpack,
    virtual_node_id,
)
from server import virtual_grid
from server.app import make_strategy
from server.federation_loop import run_rounds
from server.messaging import CountingGrid, content_bytes
from server.results.run_folder import ResultsWriter
from server.virtual_grid import VirtualGrid, VirtualGridError
from simulations.launch.in_process_federation import InProcessGrid, delivered, federation

CLIENTS, SUPERNODES = 12, 3


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Server-side messages need the task identity a ServerApp process has."""
    for key, value in {"_run_id": 7, "_node_id": 1, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, key, value)


def _cfg(results: Path, grouped: bool, mode: str, **extra: Any) -> RunConfig:
    return RunConfig.from_run_config(
        {
            "task": "digits", "privacy-mode": mode, "client-sampling-rate": 0.5,
            "num-rounds": 3, "noise-multiplier": 1.0, "target-epsilon": 0.0,
            "reproducible-noise": True, "min-available-nodes": CLIENTS,
            "min-train-nodes": 1, "results-dir": str(results),
            "virtual-clients": CLIENTS if grouped else 0, **extra,
        }
    )  # fmt: skip


def _supernodes(cfg: RunConfig, count: int = SUPERNODES, **node: Any) -> dict[int, Context]:
    """Simulated SuperNodes as Flower's engine makes them: partition-id g of count."""
    return {
        1000 + g: Context(
            run_id=1, node_id=1000 + g,
            node_config={"partition-id": g, "num-partitions": count, **node},
            state=RecordDict(), run_config=cfg.to_run_config(),
        )
        for g in range(count)
    }  # fmt: skip


def _run(tmp_path: Path, grouped: bool, mode: str) -> tuple[list[dict], Path]:
    out = tmp_path / f"{mode}-{'grouped' if grouped else 'plain'}"
    # Sample-level rounds also evaluate on every client's local test split.
    evaluation = {"fraction-evaluate": 1.0, "local-test-fraction": 0.2}
    cfg = _cfg(out, grouped, mode, **(evaluation if mode == "sample" else {}))
    if grouped:
        grid: Any = VirtualGrid(InProcessGrid(_supernodes(cfg)), CLIENTS)
    else:  # one node per client, with the node IDs the virtual clients get
        grid = InProcessGrid(federation(cfg, range(CLIENTS), CLIENTS, first_node=1))
    initial = ArrayRecord(build_model("digits", 10, seed=cfg.seed).state_dict())
    run_rounds(
        grid, cfg, make_strategy(cfg, out), initial,
        lambda _arrays: {"accuracy": 0.0, "loss": 0.0}, ResultsWriter(out, cfg), 0.0,
    )  # fmt: skip
    return [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()], out


def _ledger_history(folder: Path) -> dict[str, Any]:
    saved = json.loads((folder / "privacy-ledger.json").read_text())
    return {k: saved[k] for k in ("accountant", "delta", "history", "rounds", "runs")}


@pytest.mark.parametrize("mode", ["client", "sample"])
def test_grouped_run_equals_one_supernode_per_client(tmp_path: Path, mode: str) -> None:
    grouped, g_out = _run(tmp_path, True, mode)
    plain, p_out = _run(tmp_path, False, mode)
    assert len(grouped) == len(plain) == 3
    for a, b in zip(grouped, plain, strict=True):
        ours = sorted((c["node_id"], c["partition_id"], c["status"]) for c in a["clients"])
        theirs = sorted(
            (c["node_id"], c["partition_id"], c["status"]) for c in b["clients"]
        )
        assert ours == theirs and ours, a["round"]
        assert all(status == "trained" for _, _, status in ours)
        assert (a["federated_evaluation"] is not None) == (mode == "sample")
        if mode == "sample":  # the same scores, averaged in another reply order
            assert a["federated_evaluation"] == pytest.approx(b["federated_evaluation"])
    digest = [
        hashlib.sha256((o / "model.pt").read_bytes()).hexdigest() for o in (g_out, p_out)
    ]
    assert digest[0] == digest[1]
    nodes = sorted(p.name for p in (g_out / "nodes").iterdir())
    assert nodes == sorted(p.name for p in (p_out / "nodes").iterdir()) and nodes
    for name in nodes:
        assert _ledger_history(g_out / "nodes" / name) == _ledger_history(
            p_out / "nodes" / name
        ), name


def _train_group(cfg: RunConfig, partitions: list[int]) -> RecordDict:
    initial = ArrayRecord(build_model("digits", 10, seed=cfg.seed).state_dict())
    content = RecordDict({"arrays": initial, "config": ConfigRecord({"server-round": 1})})
    entries = [
        Entry(virtual_node_id(p), p, f"m{p}", "train", content=content) for p in partitions
    ]
    return pack(entries)


def test_a_partition_the_supernode_does_not_host_is_refused(tmp_path: Path) -> None:
    """The server plays a SuperNode's neighbour: partition 1 lives on SuperNode 1, so
    SuperNode 0 refuses the whole group and trains none of it."""
    cfg = _cfg(tmp_path / "r", True, "sample")
    node = _supernodes(cfg)[1000]  # hosts 0, 3, 6, 9
    msg = delivered(_train_group(cfg, [0, 1]), group_type("train"), 1000)
    with pytest.raises(ValueError, match=r"partitions \[1\].*refused, nothing trained"):
        client_app.app(msg, node)
    assert not (tmp_path / "r" / "nodes").exists()  # no ledger step, no shard


def test_a_device_refuses_to_host_virtual_clients(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "r", True, "sample")
    device = _supernodes(cfg, 1, **{"state-dir": str(tmp_path / "state")})[1000]
    for content, kind in (
        (_train_group(cfg, [0]), group_type("train")),
        (RecordDict(), DISCOVERY_TYPE),
    ):
        with pytest.raises(ValueError, match="virtual clients exist only in a simulation"):
            client_app.app(delivered(content, kind, 1000), device)
    assert not (tmp_path / "state").exists()


def test_the_grid_shows_one_node_per_client_and_refuses_others(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "r", True, "sample")
    grid = VirtualGrid(InProcessGrid(_supernodes(cfg)), CLIENTS)
    assert list(grid.get_node_ids()) == [virtual_node_id(p) for p in range(CLIENTS)]
    stray = Message(RecordDict(), dst_node_id=CLIENTS + 1, message_type="train")
    with pytest.raises(VirtualGridError, match="not a virtual client"):
        grid.push_messages([stray])
    # Two of the three SuperNodes so far: not ready (no client shown) until the third.
    nodes = _supernodes(cfg)
    two = InProcessGrid(dict(list(nodes.items())[:2]))
    waiting = VirtualGrid(two, CLIENTS)
    assert list(waiting.get_node_ids()) == []
    two.contexts = nodes
    assert len(list(waiting.get_node_ids())) == CLIENTS
    # SuperNodes that host another federation than the run's are refused by name.
    wrong = VirtualGrid(InProcessGrid(_supernodes(cfg)), CLIENTS + 1)
    with pytest.raises(VirtualGridError, match="13 virtual clients on 3 SuperNodes"):
        list(wrong.get_node_ids())


def test_a_supernode_silent_at_first_is_asked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A SuperNode that does not answer the first question in time (its Ray worker
    still starting on a busy machine) is asked again by the next call, not waited
    for until the node-wait timeout; one that names partitions off its stride is
    refused by name."""
    monkeypatch.setattr(virtual_grid, "DISCOVERY_TIMEOUT_S", 0.2)
    cfg = _cfg(tmp_path / "r", True, "sample")
    asked: list[int] = []

    def lost_once(node: int, message_type: str) -> bool:
        if message_type != DISCOVERY_TYPE:
            return False
        asked.append(node)
        return node == 1001 and asked.count(1001) == 1

    grid = VirtualGrid(InProcessGrid(_supernodes(cfg), lost=lost_once), CLIENTS)
    with caplog.at_level(logging.WARNING):
        assert list(grid.get_node_ids()) == []
    assert "SuperNodes [1001] did not say which clients they host" in caplog.text
    assert list(grid.get_node_ids()) == [virtual_node_id(p) for p in range(CLIENTS)]
    assert asked.count(1001) == 2 and asked.count(1000) == 2
    assert list(grid.get_node_ids()) == [virtual_node_id(p) for p in range(CLIENTS)]
    assert len(asked) == 6  # settled: not asked a third time

    class OffStride(InProcessGrid):
        def pull_messages(self, ids: Any) -> list[Message]:
            out = super().pull_messages(ids)
            for reply in out:
                if int(reply.metadata.src_node_id) == 1002:
                    reply.content.config_records[HOSTED_KEY]["first"] = 5
            return out

    bad = VirtualGrid(OffStride(_supernodes(cfg)), CLIENTS)
    with pytest.raises(VirtualGridError, match="host 11 of the run's 12 virtual clients"):
        list(bad.get_node_ids())


def test_the_shared_global_model_travels_once(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "r", True, "sample")
    one = content_bytes(_train_group(cfg, [0]))
    four = content_bytes(_train_group(cfg, [0, 3, 6, 9]))
    assert four < one * 1.1  # four instructions, one copy of the weights
    entries = unpack(_train_group(cfg, [0, 3]))
    assert [e.partition_id for e in entries] == [0, 3]
    assert entries[0].content["arrays"] is entries[1].content["arrays"]


def test_a_failed_supernode_fails_each_of_its_clients_by_name(tmp_path: Path) -> None:
    """A SuperNode whose whole group fails (its ClientApp crashed, or Flower answered
    for it): each virtual client of the group gets the error, and the server's
    drop-out accounting names each one, not the SuperNode."""
    cfg = _cfg(tmp_path / "r", True, "sample")

    class Failing(InProcessGrid):
        def push_messages(self, messages: Any) -> list[str]:
            ids = []
            for message in messages:
                instruction = delivered(message.content, message.metadata.message_type,
                                        int(message.metadata.dst_node_id))  # fmt: skip
                ids.append(instruction.metadata.message_id)
                if instruction.metadata.message_type == DISCOVERY_TYPE or (
                    int(message.metadata.dst_node_id) != 1000
                ):
                    reply = client_app.app(instruction, self.contexts[
                        int(message.metadata.dst_node_id)])  # fmt: skip
                else:
                    reply = Message(
                        Error(0, "Error: Node Unavailable"), reply_to=instruction
                    )
                self.waiting[instruction.metadata.message_id] = reply
            return ids

    grid = CountingGrid(VirtualGrid(Failing(_supernodes(cfg)), CLIENTS))
    ids = list(grid.get_node_ids())
    initial = ArrayRecord(build_model("digits", 10, seed=cfg.seed).state_dict())
    content = RecordDict({"arrays": initial, "config": ConfigRecord({"server-round": 1})})
    replies = grid.send_and_receive(
        [Message(content, dst_node_id=i, message_type="train") for i in ids], timeout=60
    )
    assert len(replies) == CLIENTS
    assert {int(r.metadata.src_node_id) for r in replies if not r.has_error()} == {
        virtual_node_id(p) for p in range(CLIENTS) if p % SUPERNODES
    }
    errors = [r for r in replies if r.has_error()]
    assert len(errors) == 4  # partitions 0, 3, 6, 9
    assert sorted(grid.unavailable) == [virtual_node_id(p) for p in (0, 3, 6, 9)]


def test_a_loss_that_cannot_be_batched_trains_one_by_one_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Batched training is only a faster path: when torch.func fails on it, each
    client trains alone, to the same model, and the log says why."""
    import client.training.vectorised as vectorised

    def broken(*_args: Any, **_kwargs: Any) -> list[Any]:
        raise RuntimeError("vmap: data-dependent control flow")

    plain, p_out = _run(tmp_path / "a", False, "client")
    monkeypatch.setattr(vectorised, "train_many", broken)
    with caplog.at_level("WARNING", logger="privfed.client"):
        grouped, g_out = _run(tmp_path / "b", True, "client")
    assert "they train one by one" in caplog.text and "data-dependent" in caplog.text
    assert [r["clients_trained"] for r in grouped] == [r["clients_trained"] for r in plain]
    digest = [
        hashlib.sha256((o / "model.pt").read_bytes()).hexdigest() for o in (g_out, p_out)
    ]
    assert digest[0] == digest[1]
    assert not vectorised._PRECOMPUTED
