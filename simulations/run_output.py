"""Stream a ``flwr run`` and report its results folder, for the scripts."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def stream_process(
    proc: subprocess.Popen[str],
    deadline: float,
    check: Callable[[], str | None] | None = None,
) -> int:
    """Copy the run's output to stdout until it exits or the deadline passes.

    ``check`` is called about once a second; a message from it ends the stream
    early (exit 1), e.g. when a process the run depends on has died.
    """

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    while True:
        try:
            code = proc.wait(timeout=1.0)
            reader.join(timeout=5)
            return code
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                print("[privfed] time limit reached; stopping the run", flush=True)
                return 124
            problem = check() if check is not None else None
            if problem:
                print(f"[privfed] stopping the run: {problem}", flush=True)
                return 1


def report_results(
    code: int, results_dir: Path, seconds: float, work: Path, launched_at: float
) -> int:
    summary_path = results_dir / "summary.json"
    if not summary_path.exists():
        print(
            f"[privfed] FAILED after {seconds:.0f} s (exit {code}): no summary.json in "
            f"{results_dir}; logs in {work}",
            file=sys.stderr,
        )
        return code or 1
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "completed":
        print(
            f"[privfed] run FAILED: {summary.get('stop_reason')}; see {results_dir}",
            file=sys.stderr,
        )
        return code or 1
    final = summary.get("final_central", {})
    eps_text = summary.get("epsilon_text") or "no client trained, so no ε was spent"
    if summary.get("noise_reproducible"):
        print(f"[privfed] WARNING: {summary['noise']}", flush=True)
    print(
        f"[privfed] done in {seconds:.0f} s: {summary['stop_reason']}; "
        f"accuracy {final.get('accuracy', float('nan')):.4f}; {eps_text}",
        flush=True,
    )
    _print_timing(results_dir, summary, launched_at)
    print(f"[privfed] results: {results_dir}", flush=True)
    return code


def _print_timing(results_dir: Path, summary: dict[str, Any], launched_at: float) -> None:
    """Start-up (launch to round 1) and per-round orchestration, from the results."""
    lines = (results_dir / "rounds.jsonl").read_text().splitlines()
    if not lines:
        return
    first = json.loads(lines[0])
    breakdown = summary.get("time_breakdown_seconds", {})
    print(
        f"[privfed] time: launch to round 1 {first['started_at'] - launched_at:.1f} s "
        f"(ServerApp start to round 1 {breakdown.get('startup_to_round_1', 0):.1f} s); "
        f"orchestration {summary.get('orchestration_seconds_per_round_median')} s/round "
        f"(median); client compute {breakdown.get('client_compute_sum', 0):.1f} s in all",
        flush=True,
    )
