"""The results folder writer: files, atomicity, refusal to overwrite a run."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord

from common.config import RunConfig
from common.models import build_model
from server.plots import plot_rounds
from server.results import ResultsWriter

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
