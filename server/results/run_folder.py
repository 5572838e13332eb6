"""The run folder: config.json, rounds.jsonl, summary.json, model.pt and plots."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.atomic_files import atomic_write_bytes
from common.config import RunConfig, noise_statement

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "summary.json"


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("flwr", "opacus", "torch", "numpy", "flwr-datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def resolve_results_dir(cfg: RunConfig) -> Path:
    """``results-dir`` if set, else ``results/<UTC timestamp>`` in the cwd."""
    if cfg.results_dir:
        return Path(cfg.results_dir).expanduser().resolve()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path("results", stamp).resolve()


class ResultsWriter:
    """Writes one run's results folder as the run goes."""

    def __init__(
        self, out_dir: Path, cfg: RunConfig, resumed: list[dict[str, Any]] | None = None
    ) -> None:
        self.out_dir = out_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # a resume (server/results/checkpoint.py) continues the folder
        if resumed is not None:
            self._resume(cfg, resumed)
            return
        if (self.out_dir / ROUNDS_FILE).exists():
            raise FileExistsError(
                f"run config key 'results-dir': {self.out_dir} already holds a run "
                "(rounds.jsonl); choose an empty or new directory"
            )
        self.rounds: list[dict[str, Any]] = []
        config = {
            "run_config": cfg.to_run_config(),
            "noise": noise_statement(cfg),
            "versions": _versions(),
            "started_at": datetime.now(UTC).isoformat(),
        }
        self._write_json("config.json", config)

    def _resume(self, cfg: RunConfig, rounds: list[dict[str, Any]]) -> None:
        """Keep the rounds up to the checkpoint's (rewritten whole, atomically), note
        the resume in config.json, and drop the summary of the run that stopped."""
        self.rounds = list(rounds)
        text = "".join(
            json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in rounds
        )
        atomic_write_bytes(self.out_dir / ROUNDS_FILE, text.encode())
        config = json.loads((self.out_dir / "config.json").read_text(encoding="utf-8"))
        summary = self.out_dir / SUMMARY_FILE
        before = json.loads(summary.read_text(encoding="utf-8")) if summary.exists() else {}
        config["run_config"] = cfg.to_run_config()
        config.setdefault("resumes", []).append(
            {
                "started_at": datetime.now(UTC).isoformat(),
                "after_round": rounds[-1]["round"] if rounds else 0,
                "previous_status": before.get("status"),
                "previous_stop_reason": before.get("stop_reason"),
                "versions": _versions(),
            }
        )
        self._write_json("config.json", config)
        summary.unlink(missing_ok=True)

    def _write_json(self, name: str, data: Any) -> None:
        write_json(self.out_dir / name, data)

    def append_round(self, record: dict[str, Any]) -> None:
        """Append one round as a JSON line, flushed and fsynced."""
        line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
        with open(self.out_dir / ROUNDS_FILE, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self.rounds.append(record)

    def save_model(self, arrays: ArrayRecord) -> Path:
        """Checkpoint the global model's state_dict to ``model.pt`` atomically."""
        import torch  # here: the launcher reads results folders without torch (1.2 s)

        path = self.out_dir / "model.pt"
        fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=".model.pt.")
        os.close(fd)
        try:
            torch.save(arrays.to_torch_state_dict(), tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json``."""
        write_summary(self.out_dir, summary)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically; NaN or ∞ is an error."""
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` (by the ServerApp, or by a launcher if it could not)."""
    finished = datetime.now(UTC).isoformat()
    write_json(out_dir / SUMMARY_FILE, {**summary, "finished_at": finished})
