"""Real deployment: SuperLink and SuperNodes as processes, TLS, auth, faults."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from client.ledger_store import LEDGER_FILE
from client.show_ledger import main as show_ledger
from common.privacy_ledger import PrivacyLedger, epsilon_of_history
from simulations.deployment import DeploymentSpec, LocalDeployment
from simulations.processes import become_subreaper, descendants, stop_processes
from simulations.run_options import APP_DIR
from tests.process_watch import assert_all_gone, assert_loopback_only, run_watched

pytestmark = pytest.mark.e2e


def _rounds(results: Path) -> list[dict]:
    return [
        json.loads(line) for line in (results / "rounds.jsonl").read_text().splitlines()
    ]


def _by_partition(rounds: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for record in rounds:
        for client in record["clients"]:
            if client["partition_id"] is not None:
                out.setdefault(client["partition_id"], []).append(client)
    return out


def test_secure_deployment_three_nodes_two_rounds(tmp_path: Path) -> None:
    """TLS + auth, 3 SuperNodes x 2 rounds: results, cumulative ε per node, clean exit."""
    results = tmp_path / "run"
    code, out, watch = run_watched(
        ["--clients", "3", "--rounds", "2", "--set", "fraction-evaluate=0.0",
         "--results-dir", str(results)],
        module="simulations.deploy",
    )  # fmt: skip
    assert code == 0, out[-4000:]
    assert "TLS + SuperNode authentication" in out
    assert f"[privfed] results: {results}" in out
    for name in ("summary.json", "rounds.jsonl", "model.pt", "model.ts", "certs/ca.crt"):
        assert (results / name).is_file(), name
    rounds = _rounds(results)
    assert [r["clients_trained"] for r in rounds] == [3, 3]
    for pid, history in _by_partition(rounds).items():
        eps = [c["epsilon"] for c in history]
        assert eps == sorted(eps) and eps[0] < eps[-1], pid
        last = history[-1]
        assert last["epsilon"] == pytest.approx(
            epsilon_of_history([tuple(h) for h in last["history"]], 1e-5, "rdp")
        )
        ledger_file = results / "nodes" / f"node-{pid}" / LEDGER_FILE
        assert PrivacyLedger.from_json(ledger_file.read_text()).epsilon() == pytest.approx(
            last["epsilon"]
        )
        assert show_ledger([str(ledger_file.parent), "--json"]) == 0
    assert_loopback_only(watch)
    assert_all_gone(watch)


@pytest.fixture
def deployment(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A secure deployment driven from the test; everything stopped afterwards."""
    become_subreaper()
    before = {p.pid for p in descendants()}
    dep = LocalDeployment(DeploymentSpec(tmp_path / "work", tmp_path / "certs"))
    try:
        yield dep
    finally:
        dep.close()
        left = [p for p in descendants() if p.pid not in before]
        alive = [p.name() for p in left if p.status() != psutil.STATUS_ZOMBIE]
        stop_processes(left)  # reaps exited orphans that were re-parented to us
        assert not alive, f"processes left: {alive}"


def test_unregistered_and_plaintext_supernodes_are_refused(
    deployment: LocalDeployment,
) -> None:
    """Only the registered, TLS-speaking node joins; the others never get work."""
    deployment.start_superlink()
    deployment.start_supernode(
        0, {"partition-id": 0, "num-partitions": 3}, deployment.node_key(0)
    )
    stranger = deployment.start_supernode(
        1, {"partition-id": 1, "num-partitions": 3},
        deployment.node_key(1, register=False), wait=False,
    )  # fmt: skip
    plaintext = deployment.start_supernode(
        2, {"partition-id": 2, "num-partitions": 3}, None, insecure=True, wait=False
    )
    deadline = time.monotonic() + 60
    while stranger.process.running() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not stranger.process.running(), "an unregistered SuperNode kept running"
    assert "Failed to activate SuperNode" in stranger.process.log_tail(40)
    time.sleep(3)  # the plaintext node retries; give it time to (fail to) connect
    assert "Connection attempt failed" in plaintext.process.log_tail(40)
    nodes = deployment.registered_nodes()
    assert len(nodes) == 1 and nodes[0]["status"] == "online"


def _wait_for_round(results: Path, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = results / "rounds.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.5)
    pytest.fail(f"round {n} was not recorded within {timeout} s")


def test_killed_node_continues_its_ledger_and_corrupt_ledger_fails_closed(
    deployment: LocalDeployment, tmp_path: Path
) -> None:
    """Node 2 is killed and restarted: the run completes and its ε continues from
    disk. Node 1 starts with a corrupt ledger: it refuses, visibly, every round."""
    results = tmp_path / "results"
    states = {i: tmp_path / "nodes" / f"node-{i}" for i in range(3)}
    states[1].mkdir(parents=True)
    (states[1] / LEDGER_FILE).write_text('{"format": "privfed-ledger/1", "history": [[')
    deployment.start_superlink()
    for i in range(3):
        config = {"partition-id": i, "num-partitions": 3, "state-dir": str(states[i])}
        deployment.start_supernode(i, config, deployment.node_key(i))
    run_config = tmp_path / "run.toml"
    run_config.write_text(
        f"num-rounds = 3\nfraction-evaluate = 0.0\nmin-available-nodes = 3\n"
        f'min-train-nodes = 1\nround-timeout = 120.0\nresults-dir = "{results}"\n'
    )
    flwr_run = deployment.run_app(run_config, APP_DIR)
    try:
        _wait_for_round(results, 1)
        ledger_before = PrivacyLedger.from_json((states[2] / LEDGER_FILE).read_text())
        deployment.kill_supernode(2)
        time.sleep(2)
        deployment.restart_supernode(2)
        out, _ = flwr_run.communicate(timeout=600)
    finally:
        if flwr_run.poll() is None:
            flwr_run.kill()
    assert flwr_run.returncode == 0, out[-4000:]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3, summary

    ledger_after = PrivacyLedger.from_json((states[2] / LEDGER_FILE).read_text())
    assert ledger_after.rounds[: len(ledger_before.rounds)] == ledger_before.rounds
    assert len(ledger_after.rounds) > len(ledger_before.rounds)  # trained after restart
    assert ledger_after.epsilon() > ledger_before.epsilon()
    node2 = _by_partition(_rounds(results))[2]
    trained = [c for c in node2 if c["status"] == "trained"]
    assert trained[-1]["rounds_trained"] == len(ledger_after.rounds)
    assert trained[-1]["epsilon"] == pytest.approx(ledger_after.epsilon())

    for record in _rounds(results):
        corrupt = [c for c in record["clients"] if c["partition_id"] == 1]
        assert corrupt and corrupt[0]["status"] == "ledger-error", record["round"]
        assert "corrupt" in corrupt[0]["error"]
    assert "corrupt" in out and "node" in out  # the server's log shows the refusal
    assert summary["client_failures"] >= 3
    assert (states[1] / LEDGER_FILE).read_text().endswith("[[")  # never overwritten
