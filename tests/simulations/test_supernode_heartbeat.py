"""A SuperNode that declares its own heartbeat interval (simulations/deployment)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import flwr.supercore.heartbeat as sender
import flwr.supernode.cli as supernode_cli
import flwr.supernode.fleet_http_connection as connection
import pytest

from simulations.deployment import supernode_heartbeat
from simulations.deployment.local import DeploymentSpec, LocalDeployment


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
    dep = LocalDeployment(DeploymentSpec(tmp_path / "w", tmp_path / "c", secure=False))
    dep.port = 1  # no SuperLink: the nodes only need to be started and stopped
    try:
        plain = dep.start_supernode(0, {}, wait=False)
        fast = dep.start_supernode(1, {}, wait=False, heartbeat_interval=10.0)
        assert plain.process.popen.args[0].endswith("flower-supernode")
        args = fast.process.popen.args
        assert args[1:5] == [
            "-m",
            supernode_heartbeat.MODULE,
            "--heartbeat-interval",
            "10.0",
        ]
        assert fast.heartbeat_interval == 10.0
    finally:
        dep.close()
