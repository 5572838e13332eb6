"""How a run ended: the one vocabulary of ``summary.json``'s ``status``.

The ServerApp writes the summary of a run it finishes, or fails in. When it
cannot (it was stopped, killed, or never started), the launcher that started it
writes the summary from ``rounds.jsonl`` with the same fields and vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from common.config import RunConfig
from server.results.epsilon_text import epsilon_text
from server.results.run_folder import (
    ROUNDS_FILE,
    SUMMARY_FILE,
    resolve_results_dir,
    write_summary,
)


class Outcome(StrEnum):
    """How a run ended (``summary.json`` ``status``)."""

    COMPLETED = "completed"  # every planned round ran
    BUDGET_EXHAUSTED = "budget-exhausted"  # stopped early: every budget spent
    INTERRUPTED = "interrupted"  # the launcher got Ctrl-C or SIGTERM
    TIMED_OUT = "timed-out"  # the launcher's --timeout passed
    FAILED = "failed"  # an error; ``stop_reason`` says which

    @property
    def finished(self) -> bool:
        """True when the ServerApp ended the run itself, as planned or on budget."""
        return self in (Outcome.COMPLETED, Outcome.BUDGET_EXHAUSTED)

    @property
    def exit_code(self) -> int:
        """The launchers' exit code for this outcome."""
        return {
            Outcome.COMPLETED: 0,
            Outcome.BUDGET_EXHAUSTED: 0,
            Outcome.INTERRUPTED: 130,
            Outcome.TIMED_OUT: 124,
            Outcome.FAILED: 1,
        }[self]


def loop_outcome(
    rounds_completed: int,
    rounds_planned: int,
    final_statuses: Iterable[str],
    budget_stop: bool = False,
) -> Outcome:
    """The outcome of a round loop that returned (rather than raised).

    It stops early when the server's client-level budget would be passed
    (``budget_stop``), or when every client refused: on budget, or for another
    reason (e.g. every node's policy refused the run), which is a failure.
    """
    if rounds_completed >= rounds_planned:
        return Outcome.COMPLETED
    if budget_stop:
        return Outcome.BUDGET_EXHAUSTED
    if all(s == Outcome.BUDGET_EXHAUSTED.value for s in final_statuses):
        return Outcome.BUDGET_EXHAUSTED
    return Outcome.FAILED


def progress(rounds: list[dict[str, Any]], rounds_planned: int | None) -> dict[str, Any]:
    """Rounds completed, the last central metrics and max ε (with its accountant, δ
    and unit), as a summary states them."""
    last = rounds[-1] if rounds else {}
    return {
        "rounds_completed": len(rounds),
        "rounds_planned": rounds_planned,
        "final_central": last.get("central"),
        "max_epsilon": last.get("max_epsilon"),
        "max_epsilon_infinite": last.get("max_epsilon_infinite", False),
        "accountant": last.get("accountant"),
        "delta": last.get("delta"),
        "privacy_unit": last.get("privacy_unit"),
        "epsilon_text": epsilon_text(last) if last else None,
    }


def failure_summary(
    reason: str, rounds: list[dict[str, Any]], rounds_planned: int | None
) -> dict[str, Any]:
    """The summary of a run that failed, with what it had done."""
    return {
        "status": Outcome.FAILED.value,
        "stop_reason": reason,
        **progress(rounds, rounds_planned),
    }


def read_rounds(out_dir: Path) -> list[dict[str, Any]]:
    """The rounds recorded so far; a last line cut short by a kill is left out."""
    path = out_dir / ROUNDS_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rounds = [json.loads(line) for line in lines[:-1]]
    if lines:
        try:
            rounds.append(json.loads(lines[-1]))
        except json.JSONDecodeError:
            pass  # appended and fsynced whole, so only a killed write ends early
    return rounds


def read_summary(out_dir: Path) -> dict[str, Any] | None:
    """``summary.json``, or None if there is none."""
    path = out_dir / SUMMARY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def close_run(
    out_dir: Path,
    outcome: Outcome | None,
    reason: str,
    rounds_planned: int,
    launched_at: float | None = None,
) -> dict[str, Any]:
    """Make sure the run has a summary; return it. Called once every process is gone.

    ``outcome`` is what the launcher saw (interrupted, timed out, failed), or None
    when ``flwr run`` ended by itself. A summary in which the ServerApp finished
    the run stands; otherwise the launcher's outcome replaces it (the ServerApp
    may have recorded being stopped as a failure), and a run without any summary
    failed. The ServerApp's own reason is kept beside the launcher's
    (``serverapp_stop_reason``), and so is everything else it recorded (e.g. a
    client-level run's ``client_level`` block, whose ledger may hold a round that
    ``rounds.jsonl`` does not). A summary finished before ``launched_at`` (Unix
    time) is an earlier run's (a resumed folder's) and does not stand for this one.
    """
    summary = read_summary(out_dir)
    if (
        summary is not None
        and launched_at is not None
        and _finished_before(summary, launched_at)
    ):
        summary = None
    if summary is not None and (outcome is None or Outcome(summary["status"]).finished):
        return summary
    recorded = {
        k: v for k, v in (summary or {}).items() if k not in ("status", "stop_reason")
    }
    written = {
        **progress(read_rounds(out_dir), rounds_planned),
        **recorded,
        "status": (outcome or Outcome.FAILED).value,
        "stop_reason": reason,
        "written_by": "launcher",
    }
    if summary is not None:
        written["serverapp_stop_reason"] = summary.get("stop_reason")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_summary(out_dir, written)
    return written


def summary_written_since(out_dir: Path, launched_at: float) -> bool:
    """Whether ``summary.json`` was written after ``launched_at`` (Unix time)."""
    try:
        summary = read_summary(out_dir)
    except (OSError, ValueError):
        return False
    return summary is not None and not _finished_before(summary, launched_at)


def serverapp_settled(out_dir: Path, launched_at: float) -> bool:
    """After ``flwr stop``: nothing more will come from the run's ServerApp.

    It finished (``summary.json`` written since ``launched_at``), or it never began
    the run (no ``config.json`` written since then, which a ServerApp writes first):
    stopped before it fetched its run, it would wait out the launcher's grace and
    write nothing, so the launcher stops it at once and summarises the run itself.
    """
    if summary_written_since(out_dir, launched_at):
        return True
    try:
        return (out_dir / "config.json").stat().st_mtime < launched_at
    except OSError:
        return True


def _finished_before(summary: dict[str, Any], launched_at: float) -> bool:
    finished = summary.get("finished_at")
    return isinstance(finished, str) and (
        datetime.fromisoformat(finished).timestamp() < launched_at
    )


def summarise_start_failure(raw_config: dict[str, Any], exc: BaseException) -> None:
    """Write a failed summary for a ServerApp that failed before its results folder.

    The folder is ``results-dir`` (or the default one) if that is a string and
    the folder holds no run yet; a run in it is never overwritten.
    """
    raw = raw_config.get("results-dir", "")
    if not isinstance(raw, str):
        return
    out_dir = resolve_results_dir(RunConfig(results_dir=raw))
    if (out_dir / ROUNDS_FILE).exists() or (out_dir / SUMMARY_FILE).exists():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    write_summary(out_dir, failure_summary(f"{type(exc).__name__}: {exc}", [], None))
