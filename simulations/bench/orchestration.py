"""Orchestration cost: start-up to round 1 and per-round overhead with near-zero work.

Runs ``simulations.run`` on digits with 10 clients that each take one DP-SGD
step per round (batch 512 is larger than a ~130-example shard, so the sample
rate is 1), repeated ``--repeats`` times, and prints the medians of: command to
round 1 (the command's start to the first round's start), launch to round 1 (what
the launcher prints: from the SuperLink's start), ServerApp start to round 1,
per-round orchestration (round wall time minus the slowest client's work and
central evaluation; see ``timing_seconds`` in ``rounds.jsonl``), the command's wall
time and its CPU time (every process of the run; the rows' units are seconds and
CPU-seconds).

``--engines process ray`` runs this checkout on each simulation engine in turn
(docs/simulation.md, "Engines"); ``--baseline DIR`` runs another checkout (a ``git
worktree`` of an older commit, with a ``.venv`` of its own or a link to this one)
alternately with this one, so that all are measured under the same load; a table per
configuration.

    python -m simulations.bench.orchestration --clients 10 --rounds 10 --repeats 3
    python -m simulations.bench.orchestration --clients 10 --rounds 1 --repeats 5 \
        --engines process ray
    python -m simulations.bench.orchestration --clients 10 --rounds 1 --repeats 3 \
        --baseline /tmp/privfed-032b230
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_LAUNCH = re.compile(r"launch to round 1 (\d+(?:\.\d+)?) s")


def _python(checkout: Path) -> str:
    venv = checkout / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _one_run(
    args: argparse.Namespace, checkout: Path, extra: list[str], results: Path
) -> dict[str, float]:
    argv = [
        _python(checkout), "-m", "simulations.run", "--clients", str(args.clients),
        "--rounds", str(args.rounds), "--results-dir", str(results),
        "--batch-size", "512", "--local-epochs", "1", "--target-epsilon", "8", *extra,
    ]  # fmt: skip
    launched = time.time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(argv, cwd=checkout, capture_output=True, text=True, timeout=900)
    wall = time.time() - launched
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(
            f"run in {checkout} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
        )
    printed = _LAUNCH.search(proc.stdout)
    if printed is None:
        raise SystemExit(f"run in {checkout} printed no launch-to-round-1 time")
    rounds = [json.loads(x) for x in (results / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((results / "summary.json").read_text())
    return {
        "command_to_round_1": rounds[0]["started_at"] - launched,
        "launch_to_round_1": float(printed.group(1)),
        "serverapp_to_round_1": summary["time_breakdown_seconds"]["startup_to_round_1"],
        "orchestration_per_round": summary["orchestration_seconds_per_round_median"],
        "client_compute_max": statistics.median(
            r["timing_seconds"]["client_compute_max"] for r in rounds
        ),
        "command_wall": wall,
        # the launcher reaps every process of the run (it is their subreaper), so its
        # CPU time, reaped here, is the whole run's
        "command_cpu": (after.ru_utime - before.ru_utime)
        + (after.ru_stime - before.ru_stime),
    }


def main(argv: list[str] | None = None) -> int:
    """Print one Markdown row per measure (median over repeats)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="another checkout to run alternately with this one (e.g. a git worktree)",
    )
    p.add_argument(
        "--engines",
        nargs="+",
        choices=["process", "ray"],
        help="run this checkout on each of these engines in turn (default: its default)",
    )
    args = p.parse_args(argv)
    checkouts: dict[str, tuple[Path, list[str]]] = {"this checkout": (REPO, [])}
    if args.engines:
        checkouts = {
            f"this checkout, --engine {e}": (REPO, ["--engine", e]) for e in args.engines
        }
    if args.baseline is not None:
        if not (args.baseline / "simulations" / "run.py").is_file():
            raise SystemExit(f"--baseline {args.baseline}: not a privfed checkout")
        baseline = {f"baseline {args.baseline}": (args.baseline.resolve(), [])}
        checkouts = {**baseline, **checkouts}
    base = Path(tempfile.mkdtemp(prefix="privfed-orch-"))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
    for i in range(args.repeats):
        for j, (name, (checkout, extra)) in enumerate(checkouts.items()):
            runs[name].append(_one_run(args, checkout, extra, base / f"run-{i}-{j}"))
            print(f"run {i + 1}, {name}: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in runs[name][-1].items()),
                  flush=True)  # fmt: skip
    for name, done in runs.items():
        print(f"\n{name}: {args.clients} clients, {args.rounds} rounds, "
              f"median of {args.repeats}\n")  # fmt: skip
        print("| measure | seconds (median) | all runs |\n|---|---|---|")
        for key in done[0]:
            values = [r[key] for r in done]
            print(f"| {key} | {statistics.median(values):.2f} | "
                  f"{', '.join(f'{v:.2f}' for v in values)} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
