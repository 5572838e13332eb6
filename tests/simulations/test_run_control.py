"""How launchers end runs and say so: log lines, summaries of stopped runs, options."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common.config import ConfigError, RunConfig
from server.results.outcome import (
    Outcome,
    close_run,
    serverapp_settled,
    summary_written_since,
)
from server.results.run_folder import ResultsWriter, write_summary
from simulations.deployment.deployment_spec import DeploymentSpec
from simulations.launch.flower_env import flower_environment
from simulations.launch.flwr_run import RUN_ID_WAIT_S, Interrupt, SubmittedRun
from simulations.launch.options import ray_address, resolve_ray_address

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "imports",
    ["import common; import opacus", "import opacus; import common.config"],
    ids=["common-first", "opacus-first"],
)
def test_a_flower_log_record_is_printed_once(imports: str) -> None:
    """In a process that imports Opacus (ServerApp, ClientApp) each Flower record
    comes out once, in Flower's format, and Flower's DEBUG records stay hidden
    (Opacus's logging.basicConfig printed every one a second time)."""
    code = (
        f"{imports}\nimport logging\nfrom flwr.supercore import log\n"
        "log(logging.INFO, 'marker-info')\nlog(logging.DEBUG, 'marker-debug')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    assert printed.count("marker-info") == 1, printed
    assert "marker-debug" not in printed, printed


def _record(n: int) -> dict:
    return {
        "round": n, "central": {"accuracy": 0.1 * n}, "max_epsilon": 0.5 * n,
        "accountant": "opacus-rdp", "delta": 1e-5, "privacy_unit": "record",
        "privacy_mode": "sample", "clients": [], "started_at": time.time(),
    }  # fmt: skip


def test_a_stopped_run_keeps_what_its_serverapp_recorded(tmp_path: Path) -> None:
    """The launcher's outcome and reason replace a ServerApp's own failure; the
    rest it recorded (a client-level ledger block, Flower runs) stays, and the
    summary names ε's accountant, δ and unit."""
    writer = ResultsWriter(tmp_path / "run", RunConfig(num_rounds=5))
    for n in (1, 2):
        writer.append_round(_record(n))
    ledger_block = {"epsilon": 1.25, "rounds": 3, "privacy_unit": "client"}
    write_summary(
        writer.out_dir,
        {"status": "failed", "stop_reason": "SystemExit: 0", "client_level": ledger_block,
         "runs": [{"run_id": 7}], "traceback": "Traceback ..."},
    )  # fmt: skip
    summary = close_run(writer.out_dir, Outcome.INTERRUPTED, "SIGTERM", 5)
    assert summary["status"] == "interrupted" and summary["stop_reason"] == "SIGTERM"
    assert summary["serverapp_stop_reason"] == "SystemExit: 0"
    assert summary["client_level"] == ledger_block and summary["runs"] == [{"run_id": 7}]
    assert summary["rounds_completed"] == 2 and summary["final_central"] == {
        "accuracy": 0.2
    }
    assert (summary["max_epsilon"], summary["accountant"], summary["delta"]) == (
        1.0,
        "opacus-rdp",
        1e-5,
    )
    assert summary["privacy_unit"] == "record" and "per record" in summary["epsilon_text"]
    assert json.loads((writer.out_dir / "summary.json").read_text())["status"] == (
        "interrupted"
    )


def test_summary_written_since(tmp_path: Path) -> None:
    """A summary counts as this run's only if it was written after the launch."""
    assert not summary_written_since(tmp_path, time.time())
    write_summary(tmp_path, {"status": "failed", "stop_reason": "x"})
    assert summary_written_since(tmp_path, time.time() - 60)
    assert not summary_written_since(tmp_path, time.time() + 60)


def test_a_serverapp_that_never_began_its_run_is_not_waited_for(tmp_path: Path) -> None:
    """After `flwr stop`, the launcher waits for the ServerApp's own summary only if
    the ServerApp began this run (wrote config.json since the launch): one stopped
    before it fetched its run writes nothing and would hold the launcher its whole
    grace (30 s)."""
    launched = time.time()
    assert serverapp_settled(tmp_path, launched)  # nothing written: it never began
    (tmp_path / "config.json").write_text("{}")
    assert not serverapp_settled(tmp_path, launched - 60)  # began, no summary yet
    assert serverapp_settled(tmp_path, launched + 60)  # a config.json of an old run
    write_summary(tmp_path, {"status": "interrupted", "stop_reason": "x"})
    assert serverapp_settled(tmp_path, launched - 60)  # began and finished


def test_ray_address_option_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """--ray-address is HOST:PORT; $RAY_ADDRESS is its default (`local`: none), and
    the Flower processes get RAY_ADDRESS=local unless a cluster is given."""
    assert ray_address("10.0.0.5:6379") == "10.0.0.5:6379"
    assert ray_address("[::1]:6379") == "[::1]:6379"
    for bad in ("10.0.0.5", "ray://10.0.0.5:10001", ":6379", "h:70000", "h:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            ray_address(bad)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_ray_address(None) is None
    assert resolve_ray_address("127.0.0.1:7000") == "127.0.0.1:7000"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6380")
    assert resolve_ray_address(None) == "127.0.0.1:6380"
    assert resolve_ray_address("127.0.0.1:7000") == "127.0.0.1:7000"  # option wins
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert resolve_ray_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(ConfigError, match="RAY_ADDRESS"):
        resolve_ray_address(None)
    home = Path("/tmp/flwr-home")
    assert flower_environment(home)["RAY_ADDRESS"] == "local"
    assert flower_environment(home, "127.0.0.1:6380")["RAY_ADDRESS"] == "127.0.0.1:6380"


def test_flower_processes_may_write_the_installed_apps_bytecode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each task process imports the app from the FAB under FLWR_HOME: where the
    caller forbids bytecode, Flower's processes may write it there all the same, so
    that one message compiles the app and the next ones reuse it."""
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    env = flower_environment(Path("/tmp/flwr-home"))
    assert "PYTHONDONTWRITEBYTECODE" not in env
    assert os.environ["PYTHONDONTWRITEBYTECODE"] == "1"  # the caller's own is kept


def test_deployment_addresses_are_loopback_and_named_by_the_certificate(
    tmp_path: Path,
) -> None:
    """Host options take loopback addresses only, and a secure deployment's server
    address must be one its certificate names."""
    work, certs = tmp_path / "w", tmp_path / "c"
    spec = DeploymentSpec(
        work, certs, server_host="127.0.0.2", node_host="127.0.0.3",
        server_sans=("127.0.0.2",),
    )  # fmt: skip
    assert (spec.server_host, spec.node_host) == ("127.0.0.2", "127.0.0.3")
    with pytest.raises(ValueError, match="server_host must be a loopback IP"):
        DeploymentSpec(work, certs, server_host="192.0.2.10", server_sans=("192.0.2.10",))
    with pytest.raises(ValueError, match="node_host must be a loopback IP"):
        DeploymentSpec(work, certs, node_host="0.0.0.0")
    with pytest.raises(ValueError, match="add it to server_sans"):
        DeploymentSpec(work, certs, server_host="127.0.0.2")
    assert DeploymentSpec(work, certs, secure=False, server_host="127.0.0.2")


def test_an_interrupt_waits_for_the_run_under_way_and_starts_no_other() -> None:
    """The sweep's main thread, once interrupted, waits for the point that runs (not
    for an executor's record of it) and the next point does not start."""
    interrupt, began, release = Interrupt(), threading.Event(), threading.Event()
    reported: list[str] = []

    def point() -> None:
        with interrupt.unless_set() as go:
            assert go
            began.set()
            release.wait(timeout=10)
            time.sleep(0.3)  # still stopping its run after the release
            reported.append("interrupted")

    thread = threading.Thread(target=point)
    thread.start()
    assert began.wait(timeout=10)
    interrupt.set("SIGTERM")
    interrupt.set("SIGINT (Ctrl-C)")  # the first one counts
    release.set()
    interrupt.wait_for_runs()
    assert reported == ["interrupted"]  # the row exists once the wait returns
    assert interrupt.how == "SIGTERM"
    with interrupt.unless_set() as go:
        assert not go
    interrupt.wait_for_runs()  # a point that did not go on is not counted
    thread.join(timeout=10)


def test_an_early_interrupt_waits_for_the_run_id_and_stops_that_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM can land after ``flwr run`` started but before it printed the run ID
    (it took over 3 s for a sweep's first point on a loaded machine): the launcher
    waits for the line while ``flwr run`` is running, then stops that run, so a run
    the SuperLink accepted is never left going."""
    late = "import time; time.sleep(5); print('Successfully started run 4242', flush=True)"
    stopped: list[int] = []
    monkeypatch.setattr(
        SubmittedRun, "_flwr_stop", lambda _self, run_id: stopped.append(run_id)
    )
    out = io.StringIO()
    run = SubmittedRun([sys.executable, "-c", late], dict(os.environ), tmp_path, "x", out)
    began = time.monotonic()
    run.stop(kill_grace=1.0)
    assert stopped == [4242] and run.run_id == 4242
    assert time.monotonic() - began < RUN_ID_WAIT_S
    assert "no run ID was printed yet" not in out.getvalue()

    gone = "import sys; sys.exit(3)"  # ended without submitting: nothing to wait for
    run = SubmittedRun([sys.executable, "-c", gone], dict(os.environ), tmp_path, "x", out)
    began = time.monotonic()
    run.stop(kill_grace=1.0)
    assert stopped == [4242] and time.monotonic() - began < 10
    assert "no run ID was printed yet, so there is no run to stop" in out.getvalue()
