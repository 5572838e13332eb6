"""A simulation on a two-node Ray cluster (``--ray-address``), all on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from simulations.launch.processes import free_port, stop_processes
from tests.helpers.listening import listening
from tests.helpers.process_watch import (
    REPO,
    Watch,
    assert_all_gone,
    assert_loopback_only,
    start_script,
    watching,
)

pytestmark = pytest.mark.e2e
CLUSTER_START_S = 120.0


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class ClusterWatch:
    """Samples the cluster's processes: raylets, the actors under each, sockets."""

    def __init__(self, helper: psutil.Process) -> None:
        self.helper = helper
        self.actor_raylets: dict[int, int] = {}  # ClientAppActor pid -> raylet pid
        self.actors_with_torch: set[int] = set()
        self.listening: set[tuple[str, int, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def raylets(self) -> list[psutil.Process]:
        return [p for p in _tree(self.helper) if _name(p) == "raylet"]

    def _run(self) -> None:
        while not self._stop.is_set():
            names: dict[int, str] = {}
            for proc in _tree(self.helper):
                try:
                    names[proc.pid] = _name(proc)
                    if names[proc.pid].startswith("ray::ClientAppActor"):
                        parent = proc.parent()
                        if parent is not None and _name(parent) == "raylet":
                            self.actor_raylets[proc.pid] = parent.pid
                        maps = Path(f"/proc/{proc.pid}/maps").read_text()
                        if "libtorch_cpu" in maps:  # it imported the ClientApp
                            self.actors_with_torch.add(proc.pid)
                except (psutil.Error, OSError):
                    continue
            for pid, sockets in listening(names).items():
                self.listening.update((ip, port, names[pid]) for ip, port in sockets)
            time.sleep(0.3)

    def __enter__(self) -> ClusterWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _name(proc: psutil.Process) -> str:
    try:
        argv = proc.cmdline()
        return Path(argv[0]).name if argv else proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


@pytest.fixture
def ray_cluster() -> Iterator[tuple[str, psutil.Process, Path]]:
    """Two Ray nodes on 127.0.0.1 (tests/helpers/ray_two_nodes.py), 1 CPU each; stopped by
    PID afterwards (SIGTERM to the holder, then every process of it that is left),
    also when the test fails."""
    # Ray's socket paths must stay short: its own temporary folder, not tmp_path.
    temp = Path(tempfile.mkdtemp(prefix="privfed-ray-", dir="/tmp"))
    env = {
        **os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": str(temp),
        "RAY_USAGE_STATS_ENABLED": "0",
    }  # fmt: skip
    port = free_port()
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.ray_two_nodes", str(port), str(temp)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    helper = psutil.Process(holder.pid)
    seen: list[psutil.Process] = []
    try:
        assert holder.stdout is not None
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(holder.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + CLUSTER_START_S
        while not any(line.startswith("{") for line in lines):
            assert holder.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)
        info = json.loads(next(line for line in lines if line.startswith("{")))
        assert info["address"] == f"127.0.0.1:{port}" and len(info["nodes"]) == 2
        seen = _tree(helper)
        yield info["address"], helper, temp
    finally:
        seen = [*seen, *_tree(helper)]
        holder.terminate()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()
        stop_processes(seen, grace=5)  # by PID whatever the holder left behind
        left = [p for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        ours = [
            p for p in psutil.process_iter(["cmdline"])
            if any(str(temp) in part for part in (p.info["cmdline"] or []))
        ]  # fmt: skip
        shutil.rmtree(temp, ignore_errors=True)
        assert not left and not ours, f"Ray processes left: {left} {ours}"


def test_simulation_runs_its_clientapps_on_both_nodes_of_a_ray_cluster(
    tmp_path: Path, ray_cluster: tuple[str, psutil.Process, Path]
) -> None:
    """`--ray-address` attaches Flower's simulation engine to a running two-node
    cluster (1 CPU each, 1 CPU per ClientApp): a ClientApp actor runs under each
    node's raylet and trains, the run completes, every listening socket of the
    cluster and of the run is on loopback, and the run leaves the cluster as it
    found it."""
    address, helper, _temp = ray_cluster
    results = tmp_path / "run"
    args = ["--clients", "2", "--rounds", "1", "--client-cpus", "1",
            "--ray-address", address, "--results-dir", str(results)]  # fmt: skip
    with ClusterWatch(helper) as cluster:
        raylets = {p.pid for p in cluster.raylets()}
        assert len(raylets) == 2
        proc = start_script("simulations.run", args)
        with watching(proc) as watch:
            out, _ = proc.communicate(timeout=600)
        time.sleep(1)  # one more sample after the run
    assert proc.returncode == 0, out[-4000:]
    assert f"[privfed] Engine: Ray: the running Ray cluster at {address}" in out
    summary = json.loads((results / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    rounds = [json.loads(x) for x in (results / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["clients_trained"] == 2
    assert set(cluster.actor_raylets.values()) == raylets, cluster.actor_raylets
    assert cluster.actors_with_torch == set(cluster.actor_raylets), (
        "an actor did not load the ClientApp"
    )
    assert not any("raylet" in n or "gcs_server" in n for n in watch.names), (
        "the run started a Ray instance of its own"
    )
    assert_loopback_only(Watch(listening=cluster.listening))  # GCS, raylets, agents
    assert_loopback_only(watch)
    assert_all_gone(watch)
    assert {p.pid for p in cluster.raylets()} == raylets  # the cluster is still up
