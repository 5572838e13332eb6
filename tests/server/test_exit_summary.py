"""The ServerApp writes its summary when Flower makes it exit after ``flwr stop``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from server.results.exit_summary import FLOWER_EXIT_REASON, ExitSummary

REPO = Path(__file__).resolve().parents[2]
PROBE = "tests.helpers.serverapp_exit_probe"


def test_a_slow_flower_exit_still_leaves_the_serverapps_summary(tmp_path: Path) -> None:
    """Flower's SIGINT on a revoked token, with its own exit work slower than its 5 s
    force-exit timer (as in a CI run): main's ``except`` never runs, yet summary.json
    says the run was stopped, with what it had done. Without the handler (the
    control) the same exit leaves no summary, which is what the launcher reported
    as a ServerApp that wrote nothing."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-m", PROBE, str(tmp_path / name), *extra],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for name, extra in (("armed", []), ("unarmed", ["--unarmed"]))
    }
    outs = {name: proc.communicate(timeout=120)[0] for name, proc in runs.items()}
    for name, proc in runs.items():
        assert proc.returncode == 0, outs[name][-3000:]  # Flower's os._exit(0)
        assert "Task stopped by user." in outs[name], outs[name][-3000:]
        assert "main returned" not in outs[name]
        assert (tmp_path / name / "config.json").is_file()  # main did start the run
    summary = json.loads((tmp_path / "armed" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["stop_reason"] == FLOWER_EXIT_REASON
    assert summary["rounds_completed"] == 0 and summary["rounds_planned"] == 3
    assert summary["runs"][0]["run_id"] == 7
    assert not (tmp_path / "unarmed" / "summary.json").exists()


def test_the_handler_writes_once_and_never_after_main_wrote_its_own() -> None:
    written: list[str] = []
    armed = ExitSummary(written.append)
    armed.armed = True  # as arm() leaves it, without registering with Flower
    armed._on_exit()
    armed._on_exit()
    assert written == [FLOWER_EXIT_REASON]
    done = ExitSummary(written.append)
    done.armed = True
    done.disarm()  # main is writing its own summary (final or failed)
    done._on_exit()
    assert written == [FLOWER_EXIT_REASON]


def test_a_serverapp_in_a_thread_of_its_own_is_not_armed() -> None:
    """In a simulation Flower runs the ServerApp in a thread that goes on while
    Flower's main thread exits: a summary written from the exit handler would miss
    the rounds it still records, so the handler is not set there."""
    seen: list[bool] = []
    in_thread = ExitSummary(lambda reason: None)
    worker = threading.Thread(
        target=lambda: (in_thread.arm(), seen.append(in_thread.armed))
    )
    worker.start()
    worker.join()
    assert seen == [False]
