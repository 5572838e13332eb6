"""The results folder writer: files, atomicity, refusal to overwrite a run."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord

from common.config import RunConfig
from common.tasks.models import build_model
from server.results.outcome import Outcome, close_run, loop_outcome, summarise_start_failure
from server.results.plots import plot_rounds
from server.results.run_folder import ResultsWriter, write_summary

PNG = b"\x89PNG\r\n\x1a\n"


def _record(r: int, eps: float | None) -> dict:
    return {
        "round": r, "central": {"accuracy": 0.1 * r}, "max_epsilon": eps,
        "accountant": "opacus-rdp" if eps is not None else "none", "delta": 1e-5,
    }  # fmt: skip


def test_writer_creates_readable_files(tmp_path: Path) -> None:
    """config.json, rounds.jsonl lines and model.pt are written and world-readable."""
    cfg = RunConfig(num_rounds=2)
    writer = ResultsWriter(tmp_path / "run", cfg)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["run_config"] == cfg.to_run_config()
    assert config["versions"]["opacus"] == "1.6.0"
    writer.append_round(_record(1, 1.5))
    writer.append_round(_record(2, 2.0))
    lines = (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["max_epsilon"] for line in lines] == [1.5, 2.0]
    model = build_model("digits", seed=1)
    writer.save_model(ArrayRecord(model.state_dict()))
    loaded = build_model("digits")
    loaded.load_state_dict(torch.load(tmp_path / "run" / "model.pt"))
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.parameters(), loaded.parameters(), strict=True)
    )
    writer.write_summary({"status": "completed"})
    for path in (tmp_path / "run").iterdir():
        assert not path.name.startswith("."), f"temp file left: {path.name}"
        assert path.stat().st_mode & stat.S_IROTH, path.name


def test_writer_refuses_a_folder_holding_a_run(tmp_path: Path) -> None:
    """A folder with rounds.jsonl is never appended to or overwritten."""
    ResultsWriter(tmp_path, RunConfig()).append_round(_record(1, 1.0))
    with pytest.raises(FileExistsError, match="'results-dir'"):
        ResultsWriter(tmp_path, RunConfig())


def test_nan_is_refused_rather_than_written(tmp_path: Path) -> None:
    """Invalid JSON (NaN) is an error, not a silently unreadable file."""
    writer = ResultsWriter(tmp_path, RunConfig())
    with pytest.raises(ValueError):
        writer.append_round({"round": 1, "loss": float("nan")})


def test_plots(tmp_path: Path) -> None:
    """Accuracy and ε plots for a private run; only accuracy for a non-private one."""
    written = plot_rounds([_record(1, 1.0), _record(2, 2.0)], tmp_path, "t")
    assert [p.name for p in written] == ["accuracy.png", "epsilon.png"]
    assert all(p.read_bytes()[:8] == PNG for p in written)
    other = tmp_path / "np"
    other.mkdir()
    written = plot_rounds([_record(1, None)], other, "t")
    assert [p.name for p in written] == ["accuracy.png"]


@pytest.mark.parametrize(
    ("completed", "statuses", "outcome"),
    [
        (3, ["trained", "budget-exhausted"], Outcome.COMPLETED),
        (2, ["budget-exhausted", "budget-exhausted"], Outcome.BUDGET_EXHAUSTED),
        (1, ["policy-refused"], Outcome.FAILED),
        (2, ["budget-exhausted", "policy-refused"], Outcome.FAILED),
    ],
)
def test_loop_outcome(completed: int, statuses: list[str], outcome: Outcome) -> None:
    """All rounds: completed; stopped early on budgets only: budget-exhausted."""
    assert loop_outcome(completed, 3, statuses) is outcome


def _run_folder(tmp_path: Path, rounds: int) -> Path:
    writer = ResultsWriter(tmp_path / "run", RunConfig(num_rounds=5))
    for r in range(1, rounds + 1):
        writer.append_round(_record(r, 0.5 * r))
    return writer.out_dir


def test_launcher_writes_the_summary_of_a_killed_serverapp(tmp_path: Path) -> None:
    """No summary.json: the launcher's outcome, rounds done, last accuracy and ε."""
    out = _run_folder(tmp_path, 2)
    with open(out / "rounds.jsonl", "a") as fh:
        fh.write('{"round": 3, "cen')  # a write cut short by the kill
    close_run(out, Outcome.INTERRUPTED, "stopped by SIGTERM", 5)
    written = json.loads((out / "summary.json").read_text())
    assert written["status"] == "interrupted" and written["stop_reason"] == (
        "stopped by SIGTERM"
    )
    assert written["rounds_completed"] == 2 and written["rounds_planned"] == 5
    assert written["final_central"] == {"accuracy": 0.2}
    assert written["max_epsilon"] == 1.0 and "opacus-rdp" in written["epsilon_text"]
    assert written["written_by"] == "launcher" and written["finished_at"]


def test_a_finished_serverapp_summary_stands(tmp_path: Path) -> None:
    """A run the ServerApp finished keeps its summary, even if a signal came after."""
    out = _run_folder(tmp_path, 1)
    write_summary(out, {"status": "completed", "stop_reason": "completed all 1 rounds"})
    assert close_run(out, Outcome.INTERRUPTED, "SIGTERM", 1)["status"] == "completed"
    assert close_run(out, None, "flwr run exited with code 0", 1)["status"] == "completed"


def test_launcher_outcome_replaces_a_serverapp_stopped_midway(tmp_path: Path) -> None:
    """A ServerApp that recorded its own stop as a failure: the launcher knows why."""
    out = _run_folder(tmp_path, 1)
    write_summary(out, {"status": "failed", "stop_reason": "SystemExit: 143"})
    assert close_run(out, None, "flwr run exited", 5)["status"] == "failed"  # kept
    summary = close_run(out, Outcome.TIMED_OUT, "the launcher's --timeout passed", 5)
    assert summary["status"] == "timed-out" and summary["rounds_completed"] == 1
    assert summary["serverapp_stop_reason"] == "SystemExit: 143"
    assert json.loads((out / "summary.json").read_text())["status"] == "timed-out"


def test_no_summary_at_all_is_a_failure(tmp_path: Path) -> None:
    """flwr run ended and nothing wrote a summary: failed, with the launcher's reason."""
    summary = close_run(tmp_path / "never", None, "no summary.json (exit 0)", 3)
    assert summary["status"] == "failed" and summary["rounds_completed"] == 0
    assert summary["final_central"] is None and summary["max_epsilon"] is None
    assert (tmp_path / "never" / "summary.json").is_file()


def test_start_failure_is_summarised_without_touching_another_run(
    tmp_path: Path,
) -> None:
    """A ServerApp refusing its config says why in results-dir, unless a run is there."""
    target = tmp_path / "new"
    summarise_start_failure({"results-dir": str(target)}, ValueError("bad key"))
    summary = json.loads((target / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["stop_reason"] == (
        "ValueError: bad key"
    )
    held = _run_folder(tmp_path, 1)
    summarise_start_failure({"results-dir": str(held)}, ValueError("bad key"))
    assert not (held / "summary.json").exists()
