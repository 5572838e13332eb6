"""A SuperNode that declares its own heartbeat interval or ClientApp patience."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import flwr.supercore.corestate.in_memory_corestate as tasks
import flwr.supercore.heartbeat as sender
import flwr.supernode.cli as supernode_cli
import flwr.supernode.fleet_http_connection as connection
import pytest

import simulations.deploy as deploy
from simulations.deployment import supernode_heartbeat
from simulations.deployment.deployment_spec import DeploymentSpec
from simulations.deployment.local import LocalDeployment
from simulations.launch import warm_template


def test_only_intervals_the_superlink_accepts() -> None:
    assert supernode_heartbeat.interval("10") == 10.0
    for bad in ("9.9", "1801"):
        with pytest.raises(argparse.ArgumentTypeError, match="from 10 to 1800 s"):
            supernode_heartbeat.interval(bad)


def test_the_node_declares_and_paces_by_the_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both places Flower reads the interval get it; flower-supernode gets the rest."""
    seen: dict[str, object] = {}

    def fake_supernode() -> int:
        seen["declared"] = connection.HEARTBEAT_DEFAULT_INTERVAL
        seen["paced"] = sender.HEARTBEAT_DEFAULT_INTERVAL
        seen["argv"] = list(sys.argv)
        return 0

    monkeypatch.setattr(supernode_cli, "flower_supernode", fake_supernode)
    monkeypatch.setattr(connection, "HEARTBEAT_DEFAULT_INTERVAL", 30)
    monkeypatch.setattr(sender, "HEARTBEAT_DEFAULT_INTERVAL", 30)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    argv = ["--heartbeat-interval", "12", "--superlink", "127.0.0.1:1", "--insecure"]
    assert supernode_heartbeat.main(argv) == 0
    assert seen == {
        "declared": 12.0,
        "paced": 12.0,
        "argv": ["flower-supernode", "--superlink", "127.0.0.1:1", "--insecure"],
    }


def test_only_a_node_given_an_interval_runs_the_wrapper(tmp_path: Path) -> None:
    """Other nodes are the stock flower-supernode; the handle keeps the interval,
    which is how restart_supernode starts the node the same way again."""
    spec = DeploymentSpec(
        tmp_path / "w", tmp_path / "c", secure=False, warm_clientapp=False,
        pull_interval=None, wake_superexecs=False,
    )  # fmt: skip
    dep = LocalDeployment(spec)
    dep.port = 1  # no SuperLink: the nodes only need to be started and stopped
    try:
        plain = dep.start_supernode(0, {}, wait=False)
        fast = dep.start_supernode(1, {}, wait=False, heartbeat_interval=10.0)
        patient = dep.start_supernode(2, {}, wait=False, task_patience=120.0)
        assert plain.process.popen.args[0].endswith("flower-supernode")
        args = fast.process.popen.args
        assert args[1:5] == [
            "-m",
            supernode_heartbeat.MODULE,
            "--heartbeat-interval",
            "10.0",
        ]
        assert fast.heartbeat_interval == 10.0
        assert patient.process.popen.args[1:5] == [
            "-m",
            supernode_heartbeat.MODULE,
            "--task-patience",
            "120.0",
        ]
        assert (patient.task_patience, patient.heartbeat_interval) == (120.0, None)
    finally:
        dep.close()


def test_a_warm_template_wraps_the_node_command_whatever_it_is(tmp_path: Path) -> None:
    """With warm ClientApps (the default) the template's wrapper comes first and then
    runs the node command it would otherwise be: stock or the heartbeat wrapper."""
    dep = LocalDeployment(DeploymentSpec(tmp_path / "w", tmp_path / "c", secure=False))
    dep.port = 1
    try:
        plain = dep.start_supernode(0, {}, wait=False)
        fast = dep.start_supernode(1, {}, wait=False, heartbeat_interval=10.0)
        prefix = warm_template.wrapper_args(warm_template.CLIENTAPP)
        assert plain.process.popen.args[: len(prefix)] == prefix
        assert fast.process.popen.args[: len(prefix)] == prefix
        for node in (plain, fast):  # the pull pace needs the wrapper on every node
            rest = node.process.popen.args[len(prefix) :]
            assert rest[1:3] == ["-m", supernode_heartbeat.MODULE]
            assert rest[rest.index("--pull-interval") + 1] == "0.5"
            assert "--wake-superexec" in rest  # its SuperExec woken per message
    finally:
        dep.close()


def test_an_idle_node_asks_again_after_the_pull_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flower's loop sleeps exactly 3 s after an empty pull (checked in its source, so
    a Flower that changes it fails here); the wrapper turns that into the interval
    and caps the 0.5 s waits for a reply at it, leaving every other sleep alone."""
    import inspect

    import flwr.supernode.start_client_internal as node_loop

    source = inspect.getsource(node_loop)
    assert source.count("time.sleep(3)") == 1 and "time.sleep(0.5)" in source
    seen: dict[str, object] = {}
    slept: list[float] = []

    def fake_supernode() -> int:
        seen["time"] = node_loop.time
        return 0

    monkeypatch.setattr(supernode_cli, "flower_supernode", fake_supernode)
    monkeypatch.setattr(node_loop, "time", node_loop.time)  # restored afterwards
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert supernode_heartbeat.main(["--pull-interval", "0.2", "--insecure"]) == 0
    paced = seen["time"]
    assert isinstance(paced, supernode_heartbeat.PacedTime)
    monkeypatch.setattr(supernode_heartbeat.time, "sleep", slept.append)
    for seconds in (3, 0.5, 0.1):
        paced.sleep(seconds)
    assert slept == [0.2, 0.2, 0.1]
    assert paced.monotonic is supernode_heartbeat.time.monotonic
    for bad in ("0.05", "3.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="from 0.1 to 3 s"):
            supernode_heartbeat.pull_interval(bad)
    with pytest.raises(ValueError, match="pull_interval"):
        DeploymentSpec(Path("/w"), Path("/c"), pull_interval=5.0)


def _token_alive_after(seconds: float, clock: list[datetime]) -> bool:
    """Flower's own SuperNode state: a ClientApp task claimed, then ``seconds`` with
    no heartbeat (the process still importing); is its token still accepted?"""
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    state = InMemoryNodeState(InMemoryObjectStore())
    task_id = state.create_task("clientapp", run_id=1)
    assert task_id is not None
    token = state.claim_task(task_id)
    assert token is not None and state.get_task_by_token(token) is not None
    clock[0] += timedelta(seconds=seconds)
    return state.get_task_by_token(token) is not None


def test_a_task_patience_keeps_a_slow_clientapp_s_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flower gives a ClientApp process 30 s to send its first heartbeat; with
    --task-patience 120 its token outlives 45 s and lapses after 120 s. The node's
    own heartbeat interval is left as Flower's."""
    clock = [datetime.now(UTC)]
    monkeypatch.setattr(tasks, "now", lambda: clock[0])
    monkeypatch.setattr(tasks, "HEARTBEAT_DEFAULT_INTERVAL", 30)
    monkeypatch.setattr(connection, "HEARTBEAT_DEFAULT_INTERVAL", 30)
    monkeypatch.setattr(sender, "HEARTBEAT_DEFAULT_INTERVAL", 30)
    assert _token_alive_after(29, clock) and not _token_alive_after(45, clock)

    monkeypatch.setattr(supernode_cli, "flower_supernode", lambda: 0)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert supernode_heartbeat.main(["--task-patience", "120", "--insecure"]) == 0
    assert sys.argv == ["flower-supernode", "--insecure"]
    assert _token_alive_after(45, clock) and _token_alive_after(119, clock)
    assert not _token_alive_after(121, clock)
    assert connection.HEARTBEAT_DEFAULT_INTERVAL == sender.HEARTBEAT_DEFAULT_INTERVAL == 30


def test_a_patience_only_lengthens_flower_s_and_one_setting_is_needed() -> None:
    assert supernode_heartbeat.patience("30") == 30.0
    for bad in ("29", "1801"):
        with pytest.raises(
            argparse.ArgumentTypeError, match="Flower's own the shortest, from 30 to 1800 s"
        ):
            supernode_heartbeat.patience(bad)
    with pytest.raises(SystemExit) as refused:
        supernode_heartbeat.main(["--insecure"])
    assert refused.value.code == 2


class _Started(Exception):
    """The fake deployment's signal that the launcher reached its nodes."""


def test_deploy_gives_every_node_the_task_patience(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``simulations.deploy --task-patience`` reaches each SuperNode it starts, and
    without it each keeps Flower's own (None)."""
    started: list[tuple[int, float | None]] = []

    class FakeDeployment:
        address = port = control_address = "127.0.0.1:0"

        def __init__(self, spec: DeploymentSpec) -> None:
            pass

        def __enter__(self) -> FakeDeployment:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def start_superlink(self) -> None:
            pass

        def start_supernode(self, index: int, *_a: object, **kw: object) -> None:
            started.append((index, kw.get("task_patience")))  # type: ignore[arg-type]
            if index == 1:
                raise _Started

    monkeypatch.setattr(deploy, "LocalDeployment", FakeDeployment)
    monkeypatch.setattr(deploy, "become_subreaper", lambda: None)
    monkeypatch.setattr(deploy, "install_signal_handlers", lambda: None)
    for extra, expected in ((["--task-patience", "120"], 120.0), ([], None)):
        started.clear()
        argv = ["--nodes", "2", "--rounds", "1", "--insecure", *extra,
                "--results-dir", str(tmp_path / f"r{len(extra)}")]  # fmt: skip
        with pytest.raises(_Started):
            deploy.run_deployment(deploy.parse_args(argv))
        assert started == [(0, expected), (1, expected)]
    with pytest.raises(SystemExit):
        deploy.parse_args(["--task-patience", "10"])  # below Flower's own 30 s
