"""A deployed node's privacy policy holds against the server (real processes).

One insecure local deployment (SuperLink and SuperNodes on 127.0.0.1) and several
``flwr run`` submissions. Node A owns a strict ``privacy-policy.toml`` and a ledger
just under its ε budget: every run asking for something weaker is refused with a
reason naming the run key, nothing trains, and its ledger file is not touched.
Node B's policy keeps its ledger on the device: it trains, the server records no ε
for it, and the ledger on its disk grows.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
import tomli_w
from opacus.accountants import RDPAccountant

from client.privacy.ledger_store import LEDGER_FILE
from client.privacy.policy import POLICY_FILE
from common.ledger.privacy_ledger import PrivacyLedger, epsilon_of_history
from simulations.deployment.deployment_spec import DeploymentSpec
from simulations.deployment.local import LocalDeployment
from simulations.launch.options import APP_DIR
from simulations.launch.processes import become_subreaper, descendants, stop_processes
from tests.helpers.process_watch import (
    Watch,
    assert_all_gone,
    assert_loopback_only,
    watch_tree,
)

pytestmark = pytest.mark.e2e

DELTA = 1e-5
PLANNING_RECORDS = 1024  # each node's public count (its shard holds about 720 records)
STRICT = {"epsilon-budget": 2.0, "delta": DELTA, "min-noise-multiplier": 0.8,
          "release-ledger": True, "planning-records": PLANNING_RECORDS}  # fmt: skip
PRIVATE_LEDGER = {"epsilon-budget": 10.0, "delta": DELTA, "min-noise-multiplier": 0.8,
                  "release-ledger": False,
                  "planning-records": PLANNING_RECORDS}  # fmt: skip
# Runs that each ask node A for one thing its policy does not allow; everything
# else stays within the policy, so the refusal must name exactly this key.
WEAKER: dict[str, dict[str, Any]] = {
    "delta": {"delta": 0.01, "noise-multiplier": 1.0, "target-epsilon": 0.0,
              "epsilon-budget": 2.0},
    "privacy-mode": {"privacy-mode": "none", "target-epsilon": 0.0},
    "noise-multiplier": {"noise-multiplier": 0.5, "target-epsilon": 0.0,
                         "epsilon-budget": 2.0},
    "epsilon-budget": {"epsilon-budget": 5.0, "noise-multiplier": 1.0,
                       "target-epsilon": 0.0},
}  # fmt: skip
BASE = {"num-rounds": 3, "min-available-nodes": 1, "min-train-nodes": 1,
        "fraction-evaluate": 0.0, "round-timeout": 120.0,
        "node-wait-timeout": 120.0}  # fmt: skip


def _rounds(results: Path) -> list[dict[str, Any]]:
    lines = (results / "rounds.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _clients(record: dict[str, Any], partition: int) -> list[dict[str, Any]]:
    return [c for c in record["clients"] if c["partition_id"] == partition]


def _start(
    dep: LocalDeployment, tmp: Path, name: str, overrides: dict[str, Any]
) -> tuple[str, subprocess.Popen[str], Path]:
    """Submit one run with ``flwr run --stream``; its output is read by :func:`_finish`."""
    results = tmp / "results" / name
    run_config = tmp / f"{name}.toml"
    run_config.write_text(tomli_w.dumps({**BASE, **overrides, "results-dir": str(results)}))
    return name, dep.run_app(run_config, APP_DIR), results


def _finish(name: str, proc: subprocess.Popen[str], results: Path) -> Path:
    """Wait for a submitted run to end cleanly; return its results folder."""
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"run {name} did not finish in 300 s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"run {name}:\n{out[-4000:]}"
    assert (results / "summary.json").is_file(), f"run {name}:\n{out[-4000:]}"
    return results


def _file_state(path: Path) -> tuple[bytes, int, int]:
    """Bytes, inode and mtime: an atomic rewrite would change the inode."""
    stat = path.stat()
    return path.read_bytes(), stat.st_ino, stat.st_mtime_ns


@pytest.fixture
def watched_deployment(tmp_path: Path):  # type: ignore[no-untyped-def]
    """An insecure deployment; every process it spawns is watched and stopped."""
    become_subreaper()
    before = {p.pid for p in descendants()}
    watch, stop = Watch(), threading.Event()
    watcher = threading.Thread(
        target=watch_tree, args=(psutil.Process(os.getpid()), watch, stop), daemon=True
    )
    watcher.start()
    dep = LocalDeployment(
        DeploymentSpec(tmp_path / "work", tmp_path / "certs", secure=False)
    )
    try:
        yield dep, watch
    finally:
        dep.close()
        stop.set()
        watcher.join()
        left = [p for p in descendants() if p.pid not in before]
        alive = [p.name() for p in left if p.status() != psutil.STATUS_ZOMBIE]
        stop_processes(left)  # reaps exited orphans that were re-parented to us
        assert not alive, f"processes left: {alive}"
    assert_loopback_only(watch)
    assert_all_gone(watch)


def test_node_policy_refuses_weaker_runs_and_can_keep_its_ledger(
    watched_deployment: tuple[LocalDeployment, Watch], tmp_path: Path
) -> None:
    """Each weaker run is refused by node A, naming the run key, with its ledger
    untouched and the run stopped after round 1. Then node B (release-ledger =
    false) trains beside A (budget exhausted): B's ε stays on B's disk."""
    dep, _ = watched_deployment
    state_a, state_b = tmp_path / "node-a", tmp_path / "node-b"
    state_a.mkdir()
    state_b.mkdir()
    (state_a / POLICY_FILE).write_text(tomli_w.dumps(STRICT))
    (state_b / POLICY_FILE).write_text(tomli_w.dumps(PRIVATE_LEDGER))
    # A's ledger is just past its budget of 2.0 (whatever q the node plans with).
    spent = PrivacyLedger("rdp", DELTA).extended(1, 1.0, 1 / 23, 12, run_id=1)
    assert 2.0 < spent.epsilon() < 2.1
    ledger_a = state_a / LEDGER_FILE
    ledger_a.write_text(spent.to_json())
    untouched = _file_state(ledger_a)

    dep.start_superlink()
    dep.start_supernode(0, {"partition-id": 0, "num-partitions": 2,
                            "state-dir": str(state_a)})  # fmt: skip

    # The SuperLink runs several runs at once; each ClientApp start costs ~10 s.
    submitted = [_start(dep, tmp_path, key, extra) for key, extra in WEAKER.items()]
    try:
        finished = {name: _finish(name, proc, out) for name, proc, out in submitted}
    finally:
        for _, proc, _ in submitted:
            if proc.poll() is None:
                proc.kill()
    for run_key, results in finished.items():
        rounds = _rounds(results)
        assert len(rounds) == 1, (run_key, rounds)  # stopped early, cleanly
        (record,) = rounds
        (client,) = record["clients"]
        assert client["status"] == "policy-refused", (run_key, client)
        assert f"run config key '{run_key}'" in client["reason"], client["reason"]
        assert POLICY_FILE in client["reason"]
        assert not client["ledger_released"] and client["epsilon"] is None
        assert client["history"] is None and client["num_examples"] is None
        assert (record["clients_trained"], record["clients_refused"],
                record["clients_failed"]) == (0, 1, 0), run_key  # fmt: skip
        assert record["max_epsilon"] is None
        summary = json.loads((results / "summary.json").read_text())
        assert summary["status"] == "failed", summary  # no node would train
        assert summary["rounds_completed"] == 1, summary
        assert summary["stop_reason"] == (
            "every client refused to train (policy-refused; stopped after round 1 of 3)"
        )
        assert summary["policy_refusals"] == 1 and summary["budget_refusals"] == 0
        assert summary["client_failures"] == 0 and summary["max_epsilon"] is None
    assert _file_state(ledger_a) == untouched

    # Node B keeps its ledger on the device; the run is within both policies.
    dep.start_supernode(1, {"partition-id": 1, "num-partitions": 2,
                            "state-dir": str(state_b)})  # fmt: skip
    results = _finish(*_start(
        dep, tmp_path, "release-ledger-false",
        {"num-rounds": 2, "min-available-nodes": 2, "noise-multiplier": 1.5,
         "target-epsilon": 0.0, "epsilon-budget": 2.0},
    ))  # fmt: skip
    rounds = _rounds(results)
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        (a,) = _clients(record, 0)
        (b,) = _clients(record, 1)
        assert a["status"] == "budget-exhausted" and a["ledger_released"], a
        assert a["epsilon"] == pytest.approx(spent.epsilon())
        assert a["epsilon"] == pytest.approx(
            epsilon_of_history([tuple(h) for h in a["history"]], DELTA, "rdp")
        )
        assert a["delta"] == DELTA and a["rounds_trained"] == 1
        assert b["status"] == "trained", b
        assert not b["ledger_released"] and b["epsilon"] is None, b
        for key in ("delta", "accountant", "history", "rounds_trained", "steps_total",
                    "client_seconds", "num_examples", "train_loss"):  # fmt: skip
            assert b[key] is None, (key, b)
        assert (record["clients_trained"], record["clients_refused"]) == (1, 1)
        assert record["max_epsilon"] == pytest.approx(spent.epsilon())  # A's only
        assert record["nodes_keeping_ledger_private"] == 1
    summary = json.loads((results / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert summary["nodes_keeping_ledger_private"] == 1
    assert summary["epsilon_by_partition"]["1"] is None
    assert _file_state(ledger_a) == untouched  # a budget refusal writes nothing

    kept = PrivacyLedger.from_json((state_b / LEDGER_FILE).read_text())
    assert kept.rounds == (1, 2) and kept.delta == DELTA
    assert kept.history() and all(sigma == 1.5 for sigma, _, _ in kept.history())
    accountant = RDPAccountant()  # independent recomputation with Opacus itself
    accountant.history = kept.history()
    assert 0 < kept.epsilon() == pytest.approx(accountant.get_epsilon(DELTA))
    assert kept.epsilon() <= 2.0
