"""End to end: a federation killed with SIGKILL resumes without losing or re-counting.

A simulation (and a TLS deployment) is killed whole after a round; ``--resume``
continues it. rounds.jsonl holds every round once, each client's ε is its ledger
history recomputed independently (dp-accounting), the model and the FedAvgM
momentum continue from the checkpoint, and the summary covers both runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from flwr.app import Context, RecordDict

from client.node_settings import NodeSettings
from client.privacy.ledger_store import load_ledger, store_ledger
from client.privacy.resent_reply import JOURNAL_FILE
from common.ledger.privacy_ledger import PrivacyLedger, epsilon_of_history
from common.tasks.models import build_model
from server.results.checkpoint import CHECKPOINT_FILE, arrays_digest, read_checkpoint
from tests.helpers.independent_accounting import dp_accounting_rdp
from tests.helpers.process_watch import (
    assert_all_gone,
    run_watched,
    start_script,
    watching,
)
from tests.helpers.runs_ahead import RunsAhead, runs_ahead

pytestmark = pytest.mark.e2e


def _rounds(results: Path) -> list[dict]:
    return [json.loads(x) for x in (results / "rounds.jsonl").read_text().splitlines()]


def _ledger_rounds(node_dir: Path) -> list[int]:
    return json.loads((node_dir / "privacy-ledger.json").read_text())["rounds"]


def _has_rounds(results: Path, rounds: int) -> Callable[[], bool]:
    path = results / "rounds.jsonl"
    return lambda: path.exists() and len(path.read_text().splitlines()) >= rounds


def _journal_round(node_dir: Path) -> int | None:
    """The round of the reply a node keeps for a repeat of its last request."""
    try:
        head = (node_dir / JOURNAL_FILE).read_bytes().partition(b"\n")[0]
        return int(json.loads(head)["round"])
    except (OSError, ValueError, KeyError):
        return None  # absent, or caught half-renamed: not yet


def kill_when_rounds(
    module: str, args: list[str], results: Path, rounds: int, timeout: float = 600
) -> str:
    """Run a script; once ``rounds`` lines are in rounds.jsonl, SIGKILL it and every
    descendant by PID (the whole federation dies at once, as on a power cut)."""
    return kill_when(module, args, _has_rounds(results, rounds), timeout)


def kill_when(
    module: str, args: list[str], ready: Callable[[], bool], timeout: float = 600
) -> str:
    """Run a script; once ``ready()``, SIGKILL it and every descendant by PID."""
    proc = start_script(module, args)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    with watching(proc) as watch:
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("".join(lines)[-4000:])
            time.sleep(0.01)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)]
        for p in tree:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    # Ray may have started a daemon after the snapshot: kill what the watcher saw.
    for pid, created in watch.pids.items():
        try:
            if psutil.Process(pid).create_time() == created:
                os.kill(pid, signal.SIGKILL)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    assert_all_gone(watch)
    reader.join(timeout=10)
    return "".join(lines)


def _check_ledgers(
    ledger_files: list[Path], last: dict, killed_at: int, spent_in_flight: set[int]
) -> None:
    """Every ledger holds rounds 1..4 once (a node that had stored the in-flight
    round and kept its reply re-sends it), except a node that had stored the round
    but not its reply: that release counts twice (killed run, rerun), which spends
    the budget of round 4, so it refuses round 4 as budget-exhausted."""
    by_partition = {c["partition_id"]: c for c in last["clients"]}
    for path in ledger_files:
        ledger = json.loads(path.read_text())
        rounds = ledger["rounds"]
        pid = int(path.parent.name.removeprefix("partition-"))
        in_flight = killed_at + 1
        if pid in spent_in_flight:
            assert rounds == [*range(1, in_flight), in_flight, in_flight], (path, rounds)
            assert by_partition[pid]["status"] == "budget-exhausted", last
            assert by_partition[pid]["rounds_trained"] == len(rounds)
        else:
            assert rounds == [1, 2, 3, 4], (path, rounds)
            assert by_partition[pid]["status"] == "trained", last
        assert len(set(ledger["runs"])) == 2  # the killed run and the resumed one
        history = [tuple(h) for h in ledger["history"]]
        steps = sum(h[2] for h in history)
        per_round = steps // len(rounds)
        assert steps == per_round * len(rounds)  # each release is a whole round
        reported = by_partition[pid]["epsilon"]
        # The same history uninterrupted: one (σ, q) for len(rounds) rounds of steps.
        sigma, q = history[0][0], history[0][1]
        assert all(h[:2] == (sigma, q) for h in history)
        uninterrupted = epsilon_of_history([(sigma, q, steps)], ledger["delta"], "rdp")
        assert reported == pytest.approx(uninterrupted, rel=1e-9)
        assert reported == pytest.approx(
            dp_accounting_rdp(ledger["history"], ledger["delta"]), rel=3e-3
        )


def test_simulation_killed_after_round_2_resumes_to_round_4(tmp_path: Path) -> None:
    """SIGKILL after round 2 of 4, --resume: rounds once each (a node that stored the
    in-flight round counts it twice and refuses round 4), ε exact, state continues."""
    results = tmp_path / "run"
    args = ["--clients", "2", "--rounds", "4", "--results-dir", str(results),
            "--set", "server-momentum=0.9"]  # fmt: skip
    kill_when_rounds("simulations.run", args, results, 2)
    assert [r["round"] for r in _rounds(results)] == [1, 2]
    assert not (results / "summary.json").exists()  # nobody could write it
    saved = read_checkpoint(results)
    assert saved.round == 2 and saved.momentum is not None
    shutil.copy(results / CHECKPOINT_FILE, tmp_path / "round-2.pt")
    fresh = build_model("digits", seed=42).state_dict()
    assert any((saved.model[k] != fresh[k]).any() for k in fresh)  # trained, not init
    round_2_eps = {c["partition_id"]: c["epsilon"] for c in _rounds(results)[1]["clients"]}
    # A node may have stored round 3 before the kill; make node 0 always have, and
    # without its reply (as if killed between the two writes), so that a second
    # charge is checked whenever the kill lands.
    nodes = results / "nodes"
    killed_run = saved.runs[0]["run_id"]
    if 3 not in _ledger_rounds(nodes / "partition-0"):
        _release_in_flight_round(nodes / "partition-0", 3, killed_run)
    (nodes / "partition-0" / JOURNAL_FILE).unlink(missing_ok=True)
    spent_in_flight = {
        int(path.name.removeprefix("partition-"))
        for path in nodes.glob("partition-*")
        if 3 in _ledger_rounds(path) and _journal_round(path) != 3
    }
    assert 0 in spent_in_flight

    code, out, watch = run_watched(["--resume", str(results)])
    assert code == 0, out[-4000:]
    assert_all_gone(watch)
    restored = re.search(
        r"restored round 2: model sha256 (\w+), momentum sha256 (\w+)", out
    )
    assert restored is not None, out[-4000:]
    assert restored.group(1) == arrays_digest(list(saved.model.values()))
    assert restored.group(2) == arrays_digest(list(saved.momentum))

    rounds = _rounds(results)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    for client in rounds[2]["clients"]:  # round 3 went on from round 2's spend
        assert client["epsilon"] > round_2_eps[client["partition_id"]]
    ledgers = sorted((results / "nodes").glob("partition-*/privacy-ledger.json"))
    assert len(ledgers) == 2
    _check_ledgers(ledgers, rounds[-1], killed_at=2, spent_in_flight=spent_in_flight)

    final = read_checkpoint(results)
    assert final.round == 4 and final.momentum is not None
    assert [r["last_round"] for r in final.runs] == [2, 4]
    assert any((a != b).any() for a, b in zip(final.momentum, saved.momentum, strict=True))
    summary = json.loads((results / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 4
    assert summary["resumed_after_round"] == 2
    run_ids = [r["run_id"] for r in summary["runs"]]
    assert len(set(run_ids)) == 2 and run_ids[0] == saved.runs[0]["run_id"]
    assert summary["wall_seconds"] == pytest.approx(
        sum(r["wall_seconds"] for r in summary["runs"]), abs=0.01
    )
    assert summary["wall_seconds"] > summary["runs"][1]["wall_seconds"]
    config = json.loads((results / "config.json").read_text())
    assert config["resumes"][0]["after_round"] == 2


def _release_in_flight_round(state_dir: Path, server_round: int, run_id: int) -> None:
    """What a node that trained in the round the server died in has on disk: the
    round stored (through the node's own ledger store) before its reply left."""
    node = NodeSettings(partition_id=0, num_partitions=2, state_dir=str(state_dir))
    context = Context(
        run_id=run_id, node_id=1, node_config={}, state=RecordDict(), run_config={}
    )
    ledger = load_ledger(context, node, "rdp", 1e-5)
    sigma, q, steps = ledger.history()[-1]
    per_round = steps // len(ledger.rounds)
    store_ledger(context, ledger.extended(server_round, sigma, q, per_round, run_id), node)


def _deployment_killed_and_resumed(folder: Path) -> dict[str, Any]:
    """Kill a 2-round TLS deployment the moment node 0 has charged round 2 and kept
    its reply (before the round can complete), and resume."""
    results = folder / "run"
    args = ["--clients", "2", "--rounds", "2", "--noise-multiplier", "1.0",
            "--results-dir", str(results)]  # fmt: skip
    node_0 = results / "nodes" / "node-0"
    kill_when("simulations.deploy", args, lambda: _journal_round(node_0) == 2)
    checkpoint = read_checkpoint(results)
    assert checkpoint.round == 1, "round 2 completed before the kill"
    killed_run = checkpoint.runs[0]["run_id"]
    ledger_file = node_0 / "privacy-ledger.json"
    before = PrivacyLedger.from_json(ledger_file.read_text())
    code, out, watch = run_watched(["--resume", str(results)], module="simulations.deploy")
    return {"results": results, "killed_run": killed_run, "ledger_file": ledger_file,
            "before": before, "code": code, "out": out, "watch": watch}  # fmt: skip


DEPLOYMENT_TEST = (
    "test_deployment_resume_keeps_a_node_ledger_that_holds_the_interrupted_round"
)


@pytest.fixture(scope="module", autouse=True)
def ahead(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunsAhead]:
    """The deployment's kill and resume start with the module, beside the
    simulation's (each a federation of its own, with its own processes)."""
    runs = {DEPLOYMENT_TEST: _deployment_killed_and_resumed}
    with runs_ahead(request, tmp_path_factory, runs) as started:
        yield started


def test_deployment_resume_keeps_a_node_ledger_that_holds_the_interrupted_round(
    ahead: RunsAhead, tmp_path: Path
) -> None:
    """TLS deployment killed in round 2 of 2 once node 0 had stored round 2 and kept
    its reply: the resumed server asks round 2 again, node 0 re-sends that update,
    and its ledger counts round 2 once (in the killed run)."""
    run = ahead.result(DEPLOYMENT_TEST, _deployment_killed_and_resumed, tmp_path)
    results, killed_run, ledger_file = run["results"], run["killed_run"], run["ledger_file"]
    before, code, out, watch = run["before"], run["code"], run["out"], run["watch"]
    assert before.rounds == (1, 2)  # node 0 holds the interrupted round
    assert code == 0, out[-4000:]
    assert "TLS + SuperNode authentication" in out
    assert_all_gone(watch)
    rounds = _rounds(results)
    assert [r["round"] for r in rounds] == [1, 2]
    after = PrivacyLedger.from_json(ledger_file.read_text())
    assert after == before  # re-sent: nothing new spent, nothing rewritten
    assert after.rounds == (1, 2) and after.runs == (killed_run, killed_run)
    resumed = {c["partition_id"]: c for c in rounds[-1]["clients"]}
    assert resumed[0]["status"] == "trained"
    assert resumed[0]["epsilon"] == pytest.approx(after.epsilon(), rel=1e-12)
    assert resumed[0]["epsilon"] == pytest.approx(
        dp_accounting_rdp([list(h) for h in after.history()], 1e-5), rel=3e-3
    )
    node_1 = PrivacyLedger.from_json(
        (results / "nodes/node-1/privacy-ledger.json").read_text()
    )
    # Once, in one run or the other; (1, 2, 2) only if the kill fell between its
    # ledger's write and its reply's (a second charge, never a free update).
    assert node_1.rounds in ((1, 2), (1, 2, 2))
    summary = json.loads((results / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert len({r["run_id"] for r in summary["runs"]}) == 2
