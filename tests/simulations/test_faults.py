"""Fault schedules and the fault-injecting TCP proxy (on loopback)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import ConfigError
from simulations.deployment.faults import (
    Fault,
    FaultSchedule,
    FaultSpecError,
    parse_random,
    random_schedule,
)
from simulations.deployment.tcp_faults import FaultProxy, Rule, read_rules, serve
from simulations.launch.processes import free_port


def test_schedule_round_trips_its_own_syntax() -> None:
    text = (
        "kill@2+5:node=3,down=10 freeze@3:node=1,for=30; partition@4:nodes=0/1/2,for=60 "
        "delay@2:node=1,ms=300,for=20 cap@1:node=0,kbit=256,for=5 superlink-kill@5+10"
    )
    schedule = FaultSchedule.parse(text, nodes=5, rounds=10)
    assert schedule.faults[0] == Fault("kill", 2, (3,), 5.0, 10.0)
    assert schedule.faults[2].nodes == (0, 1, 2)
    assert schedule.superlink_kill == Fault("superlink-kill", 5, (), 10.0, 0.0)
    assert FaultSchedule.parse(schedule.text(), 5, 10) == schedule


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("zap@1:node=1", "unknown kind"),
        ("kill@1", "key 'node'"),
        ("freeze@1:node=1", "key 'for'"),
        ("delay@1:node=1,for=2", "key 'ms'"),
        ("cap@1:node=1,for=2", "key 'kbit'"),
        ("kill@1:nod=1", "unknown key 'nod'"),
        ("kill@1:node=x", "key 'node': not a number"),
        ("kill@1:node=7", "only nodes 0..4"),
        ("kill@9:node=1", "round 9 > --rounds 3"),
        ("kill@0:node=1", "round must be ≥ 1"),
        ("partition@1:nodes=1/1,for=3", "distinct"),
        ("superlink-kill@1:node=1", "names no node"),
        ("superlink-kill@1 superlink-kill@2", "at most one"),
        ("kill-2", "expected KIND@ROUND"),
    ],
)
def test_bad_schedules_are_refused_naming_the_item_and_key(text: str, says: str) -> None:
    with pytest.raises(FaultSpecError, match=says):
        FaultSchedule.parse(text, nodes=5, rounds=3)


def test_random_schedule_is_seeded_and_keeps_the_last_round_clean() -> None:
    spec = parse_random("kills=3,freezes=2,freeze-s=30,partitions=1,partition-s=60")
    a = random_schedule(spec, nodes=20, rounds=10, seed=7)
    assert a == random_schedule(spec, nodes=20, rounds=10, seed=7)
    assert a != random_schedule(spec, nodes=20, rounds=10, seed=8)
    kinds = [f.kind for f in a.faults]
    assert kinds.count("kill") == 3 and kinds.count("freeze") == 2
    (partition,) = [f for f in a.faults if f.kind == "partition"]
    assert len(partition.nodes) == 5 and partition.duration == 60  # a quarter of 20
    assert all(2 <= f.round <= 9 for f in a.faults)
    for r in range(1, 11):  # no node gets two faults in one round
        nodes = [n for f in a.faults if f.round == r for n in f.nodes]
        assert len(nodes) == len(set(nodes))
    with pytest.raises(FaultSpecError, match="unknown key 'kils'"):
        parse_random("kils=3")


# -- the TCP fault proxy ------------------------------------------------------------


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """An echo server behind the fault proxy, both on 127.0.0.1: (proxy port, rules)."""
    echo = socket.create_server(("127.0.0.1", 0))
    echo_port = echo.getsockname()[1]

    def serve_echo() -> None:
        while True:
            try:
                conn, _ = echo.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve_echo, daemon=True).start()
    rules = tmp_path / "rules.json"
    port = free_port()
    loop = asyncio.new_event_loop()
    proxy = FaultProxy(("127.0.0.1", echo_port), rules)
    loop.create_task(serve(("127.0.0.1", port), proxy))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield port, rules
    asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()
    echo.close()


async def _cancel_all() -> None:
    """Cancel every task of the running loop (the proxy and its connections)."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _echo(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(4096):
                conn.sendall(data)
        except OSError:  # a dropped peer: the proxy resets this side too
            pass


def _round_trip(port: int, timeout: float = 5.0) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        started = time.monotonic()
        sock.sendall(b"ping")
        assert sock.recv(16) == b"ping"
        return time.monotonic() - started


def _set(rules: Path, rule: dict[str, object]) -> None:
    rules.write_text(json.dumps({"127.0.0.1": rule}))
    time.sleep(0.4)  # the proxy re-reads every 0.1 s


def test_proxy_passes_bytes_then_delays_them(proxied: tuple[int, Path]) -> None:
    port, rules = proxied
    assert _round_trip(port) < 0.2
    _set(rules, {"delay_ms": 300})
    assert 0.55 <= _round_trip(port) < 2.0  # 300 ms each way


def test_proxy_stalls_until_the_rule_is_lifted(proxied: tuple[int, Path]) -> None:
    port, rules = proxied
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        _set(rules, {"stalled": True})
        sock.sendall(b"held")
        sock.settimeout(0.8)
        with pytest.raises(TimeoutError):
            sock.recv(16)
        _set(rules, {})
        sock.settimeout(5)
        assert sock.recv(16) == b"held"


def test_proxy_drop_resets_open_and_new_connections(proxied: tuple[int, Path]) -> None:
    port, rules = proxied
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"a")
        assert sock.recv(16) == b"a"
        _set(rules, {"dropped": True})
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            sock.sendall(b"b")
            if not sock.recv(16):
                raise ConnectionResetError("closed")
    with pytest.raises((ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"c")
            if not sock.recv(16):
                raise ConnectionResetError("closed")
    _set(rules, {})
    assert _round_trip(port) < 0.5


def test_proxy_rules_are_checked_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    assert read_rules(path) == {}
    path.write_text(json.dumps({"10.0.0.1": {"delay": 5}}))
    with pytest.raises(ValueError, match="unknown rule key"):
        read_rules(path)
    with pytest.raises(ValueError, match="delay_ms"):
        Rule(delay_ms=-1)


def test_a_resumed_soak_starts_the_runs_own_nodes_and_rounds(tmp_path: Path) -> None:
    """`soak --resume DIR` without --nodes starts as many hosts as the run had, and
    plans faults over its rounds; an unreadable folder is refused naming the file."""
    from simulations import soak

    run = {"min-available-nodes": 20, "num-rounds": 10}
    (tmp_path / "config.json").write_text(json.dumps({"run_config": run}))
    args = soak.parse_args(["--resume", str(tmp_path)])
    assert (args.clients, args.rounds) == (20, 10)
    args = soak.parse_args(["--resume", str(tmp_path), "--rounds", "12"])
    assert (args.clients, args.rounds) == (20, 12)
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=str(missing / "config.json")):
        soak.parse_args(["--resume", str(missing)])
    assert soak.main(["--resume", str(missing)]) == 2


def test_a_task_fault_round_trips_and_is_only_for_node_faults() -> None:
    fault = FaultSchedule.parse("kill@2+task:node=1,down=3", nodes=2, rounds=3).faults[0]
    assert (
        fault.at_task
        and fault.after == 0.0
        and fault.text() == "kill@2+task:nodes=1,down=3"
    )
    with pytest.raises(FaultSpecError, match="'\\+task' is for node faults"):
        FaultSchedule.parse("superlink-kill@2+task", nodes=2, rounds=3)


def _injector(tmp_path: Path, dep: object, fault: Fault) -> object:
    from simulations.deployment import injector as inj

    schedule = FaultSchedule((fault,), nodes=2, rounds=3)
    return inj.FaultInjector(schedule, dep, None, tmp_path / "rules", tmp_path)  # type: ignore[arg-type]


def test_a_killed_node_is_restarted_only_after_its_heartbeat_lapsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node let in again the moment its heartbeat lapses can beat the ServerApp's
    next pull, and Flower then never answers for the message it had taken (the soak's
    round waited for its timeout): the restart waits for the lapse and a margin, even
    when the fault's own down time is shorter."""
    from types import SimpleNamespace

    from simulations.deployment import injector as inj
    from simulations.deployment.deployment_spec import SuperNodeHandle

    handle = SuperNodeHandle(1, None, {}, None, "", heartbeat_interval=10.0)  # type: ignore[arg-type]
    assert handle.heartbeat_lapse_s == 20.0  # Flower's patience of 2 intervals
    assert SuperNodeHandle(1, None, {}, None, "").heartbeat_lapse_s == 60.0  # type: ignore[arg-type]

    times: dict[str, float] = {}
    log = SimpleNamespace(log_text=lambda: "SuperNode ID: 7")
    node = SimpleNamespace(heartbeat_lapse_s=0.6, process=log)

    def kill(_i: int) -> None:
        times["kill"] = time.monotonic()

    def restart(_i: int, _timeout: float) -> SimpleNamespace:
        times["restart"] = time.monotonic()
        return SimpleNamespace(process=log)

    dep = SimpleNamespace(nodes={1: node}, kill_supernode=kill, restart_supernode=restart)
    monkeypatch.setattr(inj, "AFTER_LAPSE_S", 0.3)
    fault = Fault("kill", 1, (1,), duration=0.1)
    _injector(tmp_path, dep, fault)._kill(fault)  # type: ignore[attr-defined]
    assert times["restart"] - times["kill"] >= 0.9  # lapse 0.6 + margin 0.3, not 0.1
    events = [json.loads(x) for x in (tmp_path / inj.FAULTS_LOG).read_text().splitlines()]
    assert [e["rejoin"] for e in events if "rejoin" in e] == ["restart"]


_SUPEREXEC = """
import os, subprocess, sys, time
go = sys.argv[-1]
while not os.path.exists(go):
    time.sleep(0.02)
task = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
while os.path.exists(go):
    time.sleep(0.02)
task.kill()  # killed and not reaped: a zombie, as Flower's SuperExec leaves a done task
time.sleep(60)
"""
_NODE = "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(60)"


def test_a_task_fault_waits_until_the_node_runs_a_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`+task` fires while the node's SuperExec has a live child (a task), not before
    and not for a finished (zombie) one; a round that ends first is logged as a fault
    that could not be played."""
    from types import SimpleNamespace

    from simulations.deployment import injector as inj

    monkeypatch.setattr(inj, "is_superexec", lambda cmd, name="": "fake-superexec" in cmd)
    go = tmp_path / "go"
    node = subprocess.Popen(
        [sys.executable, "-c", _NODE, sys.executable, "-c", _SUPEREXEC, "fake-superexec",
         str(go)]
    )  # fmt: skip
    try:
        time.sleep(1.0)
        assert not inj.runs_task(node.pid)  # the SuperExec waits for a task
        go.touch()
        deadline = time.monotonic() + 10
        while not inj.runs_task(node.pid):
            assert time.monotonic() < deadline, "the task was not seen"
            time.sleep(0.05)
        go.unlink()
        deadline = time.monotonic() + 10
        while inj.runs_task(node.pid):
            assert time.monotonic() < deadline, "a finished task still counts"
            time.sleep(0.05)
    finally:
        node.kill()
        node.wait()
    assert not inj.runs_task(node.pid)  # a node that is gone runs nothing

    # The round ends before the node runs a task: not played, and the log says why.
    fault = Fault("kill", 1, (1,), at_task=True)
    dep = SimpleNamespace(nodes={1: SimpleNamespace(process=SimpleNamespace(pid=node.pid))})
    (tmp_path / "rounds.jsonl").write_text("{}\n")
    injector = _injector(tmp_path, dep, fault)
    assert injector._wait_for_tasks(fault) is False  # type: ignore[attr-defined]
    event = json.loads((tmp_path / inj.FAULTS_LOG).read_text())
    assert event["error"] is True
    assert (
        event["what"] == "could not be played: round 1 ended before node(s) [1] ran a task"
    )
