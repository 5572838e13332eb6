"""The soak on real hosts: 5 SuperNodes in their own namespaces, a kill, a partition."""

from __future__ import annotations

import ipaddress
import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.deployment.netns import capability_problem, leftovers
from tests.helpers.process_watch import Watch, assert_all_gone, run_watched, signal_after
from tests.helpers.runs_ahead import RunsAhead, runs_ahead

pytestmark = pytest.mark.e2e

CANNOT = capability_problem()


@pytest.mark.skipif(CANNOT is not None, reason=f"fault harness: {CANNOT}")
def test_soak_five_nodes_kill_and_partition(tmp_path: Path) -> None:
    """Node 1 is killed mid-task in round 2 and restarted with its state; node 3's link is
    down for 20 s in round 2. The run completes 3 distinct rounds, no ledger step
    is lost or counted twice, the dropped node is named with its reason, the
    killed node says how it rejoined, and nothing of the lab or its processes is
    left."""
    results = tmp_path / "soak"
    code, out, watch = run_watched(
        ["--nodes", "5", "--rounds", "3", "--results-dir", str(results),
         "--set", "round-timeout=150.0", "--timeout", "900",
         # node 1 is killed once it runs its round-2 task: it has taken its message and
         # not answered (2 s into the round, it had sometimes answered already)
         "--faults", "kill@2+task:node=1,down=3 partition@2+2:node=3,for=20",
         # node 1 (only killed) declares a 10 s heartbeat: the SuperLink gives up its
         # message and re-admits it after 20 s, not 60; node 3 rides out the partition
         "--kill-heartbeat", "10"],
        timeout=1200,
        module="simulations.soak",
    )  # fmt: skip
    assert code == 0, out[-5000:]
    verdict = json.loads((results / "soak-verdict.json").read_text())
    assert verdict["verdict"] == "PASS", verdict["problems"]
    assert verdict["status"] == "completed"
    assert verdict["rounds_completed"] == 3 and not verdict["duplicate_rounds"]
    assert verdict["ledger_steps_lost"] == 0
    assert verdict["ledger_steps_double_counted"] == 0
    nodes = verdict["nodes"]
    for i, node in nodes.items():
        assert node["exact"] is True, (i, node)
        accepted = set(node["accepted_rounds"])
        assert accepted <= set(node["ledger"]["rounds"]), i  # none lost
        charged = {c["round"] for c in node["charged_not_delivered"]}
        assert set(node["ledger"]["rounds"]) == accepted | charged, i  # each named
    # Node 1 was killed in round 2: it gave nothing that round, and said why.
    assert 2 not in nodes["1"]["accepted_rounds"]
    assert nodes["1"]["dropped"] == [{"round": 2, "reason": "link"}]
    assert any("re-admitted" in r for r in nodes["1"]["rejoined"]), nodes["1"]
    assert any("links up" in r for r in nodes["3"]["rejoined"]), nodes["3"]
    u = verdict["updates"]
    assert u["lost"] == 1 and u["accepted"] + u["lost"] + u["failed"] <= 15
    assert verdict["final_accuracy"] > 0.5
    # What the operator sees: the round line names the node, the summary counts it.
    assert re.search(r"round 2/3 .*\| dropped 1: node \d+ \(partition 1\) link", out)
    summary = json.loads((results / "summary.json").read_text())
    assert summary["dropped_nodes"]["link"] == 1
    events = [json.loads(x) for x in (results / "faults.jsonl").read_text().splitlines()]
    assert {e["kind"] for e in events} == {"kill", "partition"}

    prefix = re.search(r"\[soak\] lab (pf[0-9a-f]{6}):", out)
    assert prefix, out[:2000]
    assert f"lab {prefix[1]} removed: no namespace or link left" in out
    assert leftovers(prefix[1]) == []
    subnet = re.search(r"server (10\.\d+\.\d+)\.2,", out)
    assert subnet, out[:2000]
    for ip, port, name in watch.listening:  # loopback, or the lab's own addresses
        addr = ipaddress.ip_address(ip)
        addr = getattr(addr, "ipv4_mapped", None) or addr
        assert addr.is_loopback or str(addr).startswith(subnet[1] + "."), (ip, port, name)
    assert_all_gone(watch)


def _sigterm_run(folder: Path) -> tuple[int, str, Watch, Path]:
    results = folder / "soak"
    code, out, watch = signal_after(
        "simulations.soak",
        ["--nodes", "2", "--rounds", "20", "--results-dir", str(results),
         "--faults", "partition@1+1:node=1,for=600"],
        # Not before: a ServerApp stopped before it has pulled its run gets no
        # token, writes nothing, and is only stopped after the launcher's 30 s grace.
        "nodes connected; starting 20 rounds",
        signal.SIGTERM,
        timeout=300,
    )  # fmt: skip
    return code, out, watch, results


SIGTERM_TEST = "test_sigterm_stops_the_soak_and_removes_the_lab"


@pytest.fixture(scope="module", autouse=True)
def ahead(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunsAhead]:
    """The SIGTERM soak (a lab of its own: its own namespaces, links and /24) starts
    with the module, beside the five-node soak."""
    runs = {SIGTERM_TEST: _sigterm_run} if CANNOT is None else {}
    with runs_ahead(request, tmp_path_factory, runs) as started:
        yield started


@pytest.mark.skipif(CANNOT is not None, reason=f"fault harness: {CANNOT}")
def test_sigterm_stops_the_soak_and_removes_the_lab(
    ahead: RunsAhead, tmp_path: Path
) -> None:
    """SIGTERM once the ServerApp has started round 1 (node 1 is cut off, so the
    round cannot end): the run is stopped (exit 130, summary interrupted), every
    process is gone and no namespace or link of the lab is left."""
    code, out, watch, results = ahead.result(SIGTERM_TEST, _sigterm_run, tmp_path)
    assert code == 130, out[-4000:]
    prefix = re.search(r"\[soak\] lab (pf[0-9a-f]{6}):", out)
    assert prefix, out[:2000]
    assert f"lab {prefix[1]} removed: no namespace or link left" in out
    assert leftovers(prefix[1]) == []
    summary = json.loads((results / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    assert_all_gone(watch)


@pytest.mark.skipif(CANNOT is None, reason="this machine can run the harness")
def test_soak_says_why_it_cannot_run(tmp_path: Path) -> None:
    """Without root or iproute2 the soak exits 3 and names what is missing."""
    code, out, _ = run_watched(
        ["--nodes", "2", "--rounds", "1", "--results-dir", str(tmp_path / "r")],
        timeout=120,
        module="simulations.soak",
    )
    assert code == 3 and "cannot run here" in out, out
