"""Orchestration cost: start-up to round 1 and per-round overhead with near-zero work.

Runs ``simulations.run`` on digits with 10 clients that each take one DP-SGD
step per round (batch 512 is larger than a ~130-example shard, so the sample
rate is 1), repeated ``--repeats`` times, and prints the medians of: launch to
round 1 (script start to the first round's start), ServerApp start to round 1,
and per-round orchestration (round wall time minus the slowest client's work
and central evaluation; see ``timing_seconds`` in ``rounds.jsonl``).

    python -m simulations.bench.orchestration --clients 10 --rounds 10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _one_run(args: argparse.Namespace, results: Path) -> dict[str, float]:
    argv = [
        sys.executable, "-m", "simulations.run", "--clients", str(args.clients),
        "--rounds", str(args.rounds), "--results-dir", str(results),
        "--batch-size", "512", "--local-epochs", "1", "--target-epsilon", "8",
    ]  # fmt: skip
    launched = time.time()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    rounds = [json.loads(x) for x in (results / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((results / "summary.json").read_text())
    return {
        "launch_to_round_1": rounds[0]["started_at"] - launched,
        "serverapp_to_round_1": summary["time_breakdown_seconds"]["startup_to_round_1"],
        "orchestration_per_round": summary["orchestration_seconds_per_round_median"],
        "client_compute_max": statistics.median(
            r["timing_seconds"]["client_compute_max"] for r in rounds
        ),
        "wall": summary["wall_seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    """Print one Markdown row per measure (median over repeats)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="privfed-orch-"))
    runs = []
    for i in range(args.repeats):
        runs.append(_one_run(args, base / f"run-{i}"))
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[-1].items()),
              flush=True)  # fmt: skip
    print(f"\n{args.clients} clients, {args.rounds} rounds, median of {args.repeats}\n")
    print("| measure | seconds (median) | all runs |\n|---|---|---|")
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"| {key} | {statistics.median(values):.2f} | "
              f"{', '.join(f'{v:.2f}' for v in values)} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
