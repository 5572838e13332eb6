"""Stream a ``flwr run`` and report its results folder, for the scripts."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.run_outcome import Outcome, close_run


@dataclass(frozen=True)
class StreamEnd:
    """How the launcher saw a run end; ``outcome`` None: ``flwr run`` exited itself."""

    outcome: Outcome | None
    reason: str


def stream_process(
    proc: subprocess.Popen[str],
    deadline: float,
    check: Callable[[], str | None] | None = None,
) -> StreamEnd:
    """Copy the run's output to stdout until it exits or the deadline passes.

    ``check`` is called about once a second; a message from it ends the stream
    early (the run failed), e.g. when a process the run depends on has died.
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
            return StreamEnd(None, f"flwr run exited with code {code}")
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                print("[privfed] time limit reached; stopping the run", flush=True)
                return StreamEnd(Outcome.TIMED_OUT, "the launcher's --timeout passed")
            problem = check() if check is not None else None
            if problem:
                print(f"[privfed] stopping the run: {problem}", flush=True)
                return StreamEnd(Outcome.FAILED, problem)


def interrupted(exc: KeyboardInterrupt) -> StreamEnd:
    """The end of a run stopped by Ctrl-C or by the SIGTERM handler."""
    how = exc.args[0] if exc.args else "SIGINT (Ctrl-C)"
    print("\n[privfed] interrupted; stopping every process started", flush=True)
    return StreamEnd(Outcome.INTERRUPTED, f"the launcher was interrupted by {how}")


def report_results(
    end: StreamEnd,
    results_dir: Path,
    rounds_planned: int,
    seconds: float,
    work: Path,
    launched_at: float,
) -> int:
    """Make sure the run has its summary (every process is gone), report it, exit code.

    The summary says how the run ended; the exit code follows from it.
    """
    reason = end.reason
    if end.outcome is None:
        reason = f"the ServerApp wrote no summary.json ({reason}); logs in {work}"
    summary = close_run(results_dir, end.outcome, reason, rounds_planned, launched_at)
    outcome = Outcome(summary["status"])
    if not outcome.finished:
        print(
            f"[privfed] run {outcome.value.upper()} after {seconds:.0f} s, "
            f"{summary.get('rounds_completed')} round(s) completed: "
            f"{summary.get('stop_reason')}; see {results_dir}; logs in {work}",
            file=sys.stderr,
        )
        return outcome.exit_code
    final = summary.get("final_central") or {}
    eps_text = summary.get("epsilon_text") or "no client trained, so no ε was spent"
    if summary.get("noise_reproducible"):
        print(f"[privfed] WARNING: {summary['noise']}", flush=True)
    print(
        f"[privfed] done in {seconds:.0f} s ({outcome.value}): {summary['stop_reason']}; "
        f"accuracy {final.get('accuracy', float('nan')):.4f}; {eps_text}",
        flush=True,
    )
    _print_timing(results_dir, summary, launched_at)
    print(f"[privfed] results: {results_dir}", flush=True)
    return outcome.exit_code


def _print_timing(results_dir: Path, summary: dict[str, Any], launched_at: float) -> None:
    """Start-up (launch to round 1) and per-round orchestration, from the results."""
    lines = (results_dir / "rounds.jsonl").read_text().splitlines()
    if not lines:
        return
    records = [json.loads(line) for line in lines]
    # A resumed run's folder starts with the earlier runs' rounds.
    first = next((r for r in records if r["started_at"] >= launched_at), records[0])
    breakdown = summary.get("time_breakdown_seconds", {})
    print(
        f"[privfed] time: launch to round 1 {first['started_at'] - launched_at:.1f} s "
        f"(ServerApp start to round 1 {breakdown.get('startup_to_round_1', 0):.1f} s); "
        f"orchestration {summary.get('orchestration_seconds_per_round_median')} s/round "
        f"(median); client compute {breakdown.get('client_compute_sum', 0):.1f} s in all",
        flush=True,
    )
