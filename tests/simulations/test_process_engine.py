"""The process engine: ClientApp workers forked from the simulation process, run by
Flower's simulation runtime through the backend that stands in for Ray's."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from flwr.server.superlink.fleet.vce import vce_api

from common.config import ConfigError
from simulations.engine import process_workers
from simulations.engine.engines import PROCESS, RAY, choose_engine, engine_for_runs
from simulations.engine.flwr_simulation import (
    ENGINE_ENV,
    RAYBACKEND_MODULE,
    WORKERS_ENV,
    worker_count,
)

REPO = Path(__file__).resolve().parents[2]
PROBE = "tests.helpers.process_engine_probe"

PROBE_APP = """
import os
import sys
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg, context):
    config = msg.content.config_records["config"]
    if config["fail"]:
        raise ValueError("the probe was told to fail")
    if config["crash"]:
        os._exit(3)
    if config["unpicklable"]:
        context.extra = lambda: None  # pickle refuses a lambda
    print(f"probe trained node {context.node_id}", flush=True)
    total = float(msg.content.array_records["weights"]["w"].numpy().sum())
    context.state.config_records["kept"] = ConfigRecord({"node": context.node_id})
    seed = str(torch.initial_seed())
    argv = " ".join(sys.argv)
    seen = ConfigRecord({"pid": os.getpid(), "draw": seed, "sum": total, "argv": argv})
    return Message(RecordDict({"seen": seen}), reply_to=msg)
"""


def test_flowers_lines_the_engine_stands_on() -> None:
    """Flower 1.42 builds its Ray backend by importing the name ``RayBackend`` from
    ``vce/backend/raybackend.py`` when the run starts, and its simulation loop calls
    ``vce.start_vce`` by attribute with keyword arguments: the engine binds both.
    A Flower that changes either fails here, not in a run."""
    start_vce = inspect.getsource(vce_api.start_vce)
    assert "from .backend.raybackend import RayBackend" in start_vce
    assert "return RayBackend(backend_config)" in start_vce
    assert RAYBACKEND_MODULE == "flwr.server.superlink.fleet.vce.backend.raybackend"
    loop = importlib.import_module("flwr.simulation.run_simulation")._main_loop
    main_loop = inspect.getsource(loop)
    assert "vce.start_vce(\n            num_supernodes=num_supernodes," in main_loop
    assert "client_app_attr=client_app_attr," in main_loop and "run=run," in main_loop


def test_workers_run_messages_as_ray_actors_do(tmp_path: Path) -> None:
    """Two forked workers: both load the app from its folder and answer messages
    side by side (arrays whose chunks Flower cached as memoryviews included), with
    the node's context updated; each draws its own random numbers and holds none of
    flwr-simulation's arguments (its token). A ClientApp that raises, or whose reply
    cannot be sent, is a ClientAppException with the exception's text (its traceback
    in the log), and the worker goes on. A worker killed while idle is dropped and
    the other takes the messages; one that exits mid-message fails that message by
    name; with none left a message fails at once; nothing is left running."""
    (tmp_path / "probe_app.py").write_text(textwrap.dedent(PROBE_APP))
    out = tmp_path / "seen.json"
    proc = subprocess.run(
        [sys.executable, "-m", PROBE, str(tmp_path), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(out.read_text())
    assert seen["threads_before_fork"] == 1
    assert seen["worker_names"] == [process_workers.WORKER_NAME] * 2
    assert seen["num_workers"] == 2
    replies = seen["replies"]
    assert sorted(r["node"] for r in replies) == [11, 12, 13, 14]
    assert all(r["sum"] == sum(range(4096)) for r in replies)
    assert all(r["answers"] for r in replies)  # each reply answers its message
    assert all(r["state"] == r["node"] for r in replies)  # the context came back
    assert len({r["pid"] for r in replies}) == 2  # both workers took messages
    seeds = {r["pid"]: r["draw"] for r in replies}  # torch's seed, per worker
    assert len(set(seeds.values())) == 2  # drawn again, not one copied state
    assert all(len(r["argv"].split()) == 1 for r in replies)  # the program only

    kind, text = seen["failure"]
    assert kind == "ClientAppException" and "the probe was told to fail" in text
    assert "Traceback" not in text  # the text, as from a Ray actor
    assert any(
        "(ClientApp worker pid=" in x and "ValueError: the probe was told to fail" in x
        for x in proc.stdout.splitlines()
    )  # its traceback went into the log
    kind, text = seen["unpicklable"]
    assert kind == "ClientAppException" and "pickle" in text.lower()
    assert seen["workers_after_errors"] == 2

    assert seen["after_idle_kill"] == [["ok", ""], ["ok", ""]]
    assert seen["workers_after_idle_kill"] == 1
    kind, text = seen["crash"]
    assert kind == "WorkerGone" and "exited (code 3)" in text
    assert seen["workers_after_crash"] == 0
    assert seen["none_left"][0] == "WorkerGone"
    assert "every ClientApp worker has exited" in seen["none_left"][1]
    assert seen["none_left_seconds"] < 5
    assert seen["left_running"] == []
    # each worker's output reached the simulation process's stdout, by worker
    lines = [x for x in proc.stdout.splitlines() if "probe trained node" in x]
    assert len(lines) >= 6 and all(x.startswith("(ClientApp worker pid=") for x in lines)


def test_forking_is_refused_once_threads_run() -> None:
    """A fork copies locks other threads may hold: refused, not risked."""
    import threading

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with pytest.raises(RuntimeError, match="before any thread starts"):
            process_workers.fork_workers(1)
    finally:
        stop.set()
        thread.join()
    assert process_workers.FORKED == []


def test_pickling_keeps_memoryviews() -> None:
    """Plain pickle refuses a memoryview; the workers' pipe sends a copy."""
    import multiprocessing

    left, right = multiprocessing.Pipe()
    value = {"view": memoryview(b"abc"), "n": 3}
    with pytest.raises(TypeError):
        pickle.dumps(value)
    process_workers.send(left, value)
    got = process_workers.receive(right)
    assert isinstance(got["view"], memoryview) and bytes(got["view"]) == b"abc"


def test_engine_choice() -> None:
    """Ray on a cluster, the process engine otherwise; the process engine cannot
    take a cluster address."""
    assert choose_engine(None, None) is PROCESS
    assert choose_engine(None, "10.0.0.5:6379") is RAY
    assert choose_engine("ray", None) is RAY
    with pytest.raises(ConfigError, match="--engine process runs on this machine only"):
        choose_engine("process", "10.0.0.5:6379")


def test_engine_environment_puts_the_script_first(tmp_path: Path) -> None:
    """Every Flower process of the launcher finds the engine's flwr-simulation
    first on PATH, with the engine and the workers per run."""
    env = {"PATH": "/usr/bin"}
    with engine_for_runs(PROCESS, env, tmp_path, None, 2, 3) as running:
        assert running.head is None and running.workers == 3
        assert running.describe() == "process engine, 3 ClientApp workers per run"
    script = tmp_path / "engine-bin" / "flwr-simulation"
    assert env["PATH"] == f"{script.parent}{os.pathsep}/usr/bin"
    assert (env[ENGINE_ENV], env[WORKERS_ENV]) == ("process", "3")
    assert os.access(script, os.X_OK)
    assert "from simulations.engine.flwr_simulation import flwr_simulation" in (
        script.read_text()
    )


@pytest.mark.parametrize("text", ["", "0", "-1", "two"])
def test_worker_count_is_checked(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    """A bad $PRIVFED_ENGINE_WORKERS stops flwr-simulation naming the variable."""
    monkeypatch.setenv(WORKERS_ENV, text)
    with pytest.raises(SystemExit, match=WORKERS_ENV):
        worker_count()
