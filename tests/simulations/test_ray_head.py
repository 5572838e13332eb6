"""The sweep's private Ray head: a real ``ray start`` on loopback, its ports its own,
ready when Ray says so, and gone (every process under it) when the sweep ends."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import psutil
import pytest

from simulations.launch import ray_head
from simulations.launch.ray_head import (
    RAY_HEAD_LOG,
    head_argv,
    head_env,
    private_ray_head,
    ray_for_runs,
)


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_head_binds_loopback_ports_of_its_own_and_a_temp_folder_of_its_own(
    tmp_path: Path,
) -> None:
    argv = head_argv(6380, 40001, 4, tmp_path / "ray")
    assert argv[0] == str(Path(sys.executable).parent / "ray")
    assert argv[1:4] == ["start", "--head", "--block"]  # stopped with its children
    assert _flag(argv, "--node-ip-address") == "127.0.0.1"
    assert _flag(argv, "--port") == "6380"
    # Ray's client server would otherwise take port 10001 on every head
    assert _flag(argv, "--ray-client-server-port") == "40001"
    assert _flag(argv, "--num-cpus") == "4"
    assert _flag(argv, "--temp-dir") == str(tmp_path / "ray")  # not /tmp/ray
    assert "--include-dashboard=false" in argv and "--disable-usage-stats" in argv
    with pytest.raises(ValueError, match="at least one CPU, got 0"):
        head_argv(6380, 40001, 0, tmp_path)


def test_the_heads_workers_run_at_the_federations_niceness_and_it_has_no_address() -> None:
    """Ray's default worker niceness 15 starved the ClientApps behind any busy
    process (a sweep point 225 s instead of 13 s); the head is its own cluster; no
    workers start ahead of Flower's driver, which could not use them."""
    env = head_env({"RAY_ADDRESS": "local", "PATH": "/bin", "RAY_worker_niceness": "15"})
    assert env == {
        "PATH": "/bin",
        "RAY_worker_niceness": "0",
        "RAY_prestart_worker_first_driver": "0",
    }


def test_a_given_cluster_starts_no_head_and_leaves_the_address_alone(
    tmp_path: Path,
) -> None:
    env = {"RAY_ADDRESS": "10.0.0.5:6379"}
    with ray_for_runs(env, tmp_path, "10.0.0.5:6379", 2) as head:
        assert head is None
    assert env == {"RAY_ADDRESS": "10.0.0.5:6379"}
    assert not (tmp_path / RAY_HEAD_LOG).exists()


@pytest.mark.e2e
def test_a_private_head_serves_on_loopback_and_is_stopped_with_its_processes(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": "local"}
    with ray_for_runs(env, tmp_path, None, 2) as head:
        assert head is not None
        assert env["RAY_ADDRESS"] == head.address  # what every Flower process gets
        head.wait_serving()
        with socket.create_connection(("127.0.0.1", head.port), timeout=5):
            pass  # the GCS answers at the address runs are given
        head.wait_ready()
        root = psutil.Process(head.process.pid)
        tree = [root, *root.children(recursive=True)]
        names = {p.name() for p in tree}
        assert {"gcs_server", "raylet"} <= names, names
        commands = [" ".join(p.cmdline()) for p in tree]
        assert not [c for c in commands if "autoscaler/_private/monitor.py" in c]
        for proc in tree:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    assert conn.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1"), conn
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive
    sessions = tmp_path / "ray"  # linked from the launcher's folder, with a short path
    assert sessions.is_symlink() and any(sessions.glob("session_*/logs/raylet.out"))
    assert sessions.resolve().name.startswith("privfed-ray-")


def test_a_head_that_cannot_start_says_why_with_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its GCS port is taken: ``ray start`` exits, and the wait names the head, its
    exit code and its log instead of waiting out the timeout."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(ray_head, "free_port", lambda: taken.getsockname()[1])
        with private_ray_head(env, tmp_path, 1) as head:
            with pytest.raises(RuntimeError, match="ray-head exited with code") as failed:
                head.wait_ready(timeout=120)
    assert str(tmp_path / RAY_HEAD_LOG) in str(failed.value)
