"""How a launcher saw a run end, and its report of the results folder."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from server.results.outcome import Outcome, close_run


@dataclass(frozen=True)
class StreamEnd:
    """How the launcher saw a run end; ``outcome`` None: ``flwr run`` exited itself."""

    outcome: Outcome | None
    reason: str


def interrupted(exc: KeyboardInterrupt, out: TextIO | None = None) -> StreamEnd:
    """The end of a run stopped by Ctrl-C or by the SIGTERM handler."""
    how = exc.args[0] if exc.args else "SIGINT (Ctrl-C)"
    print("\n[privfed] interrupted; stopping the run", file=out or sys.stdout, flush=True)
    return StreamEnd(Outcome.INTERRUPTED, f"the launcher was interrupted by {how}")


def report_results(
    end: StreamEnd,
    results_dir: Path,
    rounds_planned: int,
    seconds: float,
    work: Path,
    launched_at: float,
    out: TextIO | None = None,
) -> int:
    """Make sure the run has its summary (every process is gone), report it, exit code.

    The summary says how the run ended; the exit code follows from it. ``out``
    (default: stdout, and stderr for a run that did not finish) gets the report.
    """
    reason = end.reason
    if end.outcome is None:
        reason = f"the ServerApp wrote no summary.json ({reason})"
    summary = close_run(results_dir, end.outcome, reason, rounds_planned, launched_at)
    outcome = Outcome(summary["status"])
    final = summary.get("final_central") or {}
    accuracy = final.get("accuracy")
    eps_text = summary.get("epsilon_text") or "no client trained, so no ε was spent"
    if not outcome.finished:
        last = "" if accuracy is None else f" (last accuracy {accuracy:.4f}; {eps_text})"
        print(
            f"[privfed] run {outcome.value.upper()} after {seconds:.0f} s, "
            f"{summary.get('rounds_completed')} round(s) completed{last}: "
            f"{summary.get('stop_reason')}; see {results_dir}; logs in {work}",
            file=out or sys.stderr,
            flush=True,
        )
        return outcome.exit_code
    out = out or sys.stdout
    if summary.get("noise_reproducible"):
        print(f"[privfed] WARNING: {summary['noise']}", file=out, flush=True)
    print(
        f"[privfed] done in {seconds:.0f} s ({outcome.value}): {summary['stop_reason']}; "
        f"accuracy {final.get('accuracy', float('nan')):.4f}; {eps_text}",
        file=out,
        flush=True,
    )
    _print_timing(results_dir, summary, launched_at, out)
    print(f"[privfed] results: {results_dir}", file=out, flush=True)
    return outcome.exit_code


def launch_to_round_1(results_dir: Path, launched_at: float) -> float | None:
    """Seconds from ``launched_at`` (Unix time) to this run's first round, if any."""
    path = results_dir / "rounds.jsonl"
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    # A resumed run's folder starts with the earlier runs' rounds.
    ours = [r for r in records if r["started_at"] >= launched_at]
    return ours[0]["started_at"] - launched_at if ours else None


def _print_timing(
    results_dir: Path, summary: dict[str, Any], launched_at: float, out: TextIO
) -> None:
    """Start-up (launch to round 1) and per-round orchestration, from the results."""
    first = launch_to_round_1(results_dir, launched_at)
    if first is None:
        return
    breakdown = summary.get("time_breakdown_seconds", {})
    print(
        f"[privfed] time: launch to round 1 {first:.1f} s "
        f"(ServerApp start to round 1 {breakdown.get('startup_to_round_1', 0):.1f} s); "
        f"orchestration {summary.get('orchestration_seconds_per_round_median')} s/round "
        f"(median); client compute {breakdown.get('client_compute_sum', 0):.1f} s in all",
        file=out,
        flush=True,
    )
