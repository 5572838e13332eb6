"""privfed beside Apple's pfl-research on one client-level workload, in one run.

Runs the peer (:mod:`simulations.bench.pfl_peer`, in pfl's own venv) and then
privfed's ``simulations.run`` on the same workload (``fmnist-client-eps3`` with the
tanh CNN on pixels, z 0.7129), one after the other on this machine, and prints one
Markdown table: per-round seconds (median of rounds 2..T), launch to exit, accuracy
after the last round, and privfed's time per round over pfl's.

    python -m simulations.bench.peer_comparison --pfl-python /tmp/pflvenv/bin/python
    python -m simulations.bench.peer_comparison --pfl-python ... --simulated-nodes 2 10000

``--simulated-nodes`` lists the privfed configurations to time (SuperNodes for the
10,000 clients; docs/simulation.md, 'Virtual clients'); 10000 is one per client.
``--engines process ray`` times each on both simulation engines (docs/simulation.md,
'Engines'); the default is the process engine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PEER = REPO / "simulations" / "bench" / "pfl_peer.py"
NOISE = 0.7129


def _run(argv: list[str], timeout: float) -> tuple[int, str, str]:
    """Run ``argv`` from the repository; on any exit of ours (SIGTERM, Ctrl-C, the
    timeout) the child gets SIGTERM (a privfed run then stops what it started)."""
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    return proc.returncode, out, err


def run_peer(python: str, *args: str, timeout: float = 1800) -> dict[str, Any]:
    """Run :mod:`simulations.bench.pfl_peer` with ``python`` (pfl's venv) and ``args``;
    its JSON figures, plus ``launch_to_exit`` as seen from here."""
    started = time.monotonic()
    code, out, err = _run([python, str(PEER), *args], timeout)
    if code != 0:
        raise SystemExit(f"pfl peer failed (exit {code}):\n{err[-3000:]}")
    line = [x for x in out.splitlines() if x.startswith("{")][-1]
    figures: dict[str, Any] = json.loads(line)
    figures["launch_to_exit"] = time.monotonic() - started
    return figures


def _privfed(rounds: int, nodes: int, engine: str, results: Path) -> dict[str, Any]:
    argv = [
        sys.executable, "-m", "simulations.run", "--preset", "fmnist-client-eps3",
        "--rounds", str(rounds), "--set", "features='pixels'",
        "--noise-multiplier", str(NOISE), "--simulated-nodes", str(nodes),
        "--engine", engine, "--results-dir", str(results),
    ]  # fmt: skip
    started = time.monotonic()
    code, out, _ = _run(argv, 3600)
    seconds = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"privfed failed (exit {code}):\n{out[-3000:]}")
    rounds_ = [json.loads(x) for x in (results / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((results / "summary.json").read_text())
    per_round = [r["seconds"] for r in rounds_[1:]] or [rounds_[0]["seconds"]]
    return {
        "per_round_median": statistics.median(per_round),
        "launch_to_exit": seconds,
        "accuracy": rounds_[-1]["central"]["accuracy"],
        "epsilon": summary.get("epsilon_text", "no ε in summary.json"),
        "orchestration_median": statistics.median(
            r["timing_seconds"]["orchestration"] for r in rounds_[1:] or rounds_
        ),
        "central_evaluation_median": statistics.median(
            r["timing_seconds"]["central_evaluation"] for r in rounds_[1:] or rounds_
        ),
    }


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through _run, which stops the child


def main(argv: list[str] | None = None) -> int:
    """Run both, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pfl-python", required=True, help="python of a venv with pfl 0.6.0")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--simulated-nodes", type=int, nargs="+", default=[2])
    p.add_argument(
        "--engines",
        nargs="+",
        choices=["process", "ray"],
        default=["process"],
        help="privfed's simulation engines to run, each after pfl (docs/simulation.md)",
    )
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    peer = run_peer(
        args.pfl_python, "--rounds", str(args.rounds), "--noise-multiplier", str(NOISE)
    )
    rows = [
        "| system | per round (median, rounds 2..T) | × pfl | launch to exit | "
        "accuracy after the last round |",
        "|---|---|---|---|---|",
        f"| pfl 0.6.0 | {peer['per_round_median_s']:.3f} s | 1.00 | "
        f"{peer['launch_to_exit']:.1f} s | {peer['accuracy'][-1]:.2%} |",
    ]
    print("\n".join(rows), flush=True)
    for nodes, engine in itertools.product(args.simulated_nodes, args.engines):
        with tempfile.TemporaryDirectory(prefix="privfed-peer-") as work:
            ours = _privfed(args.rounds, nodes, engine, Path(work) / "run")
        ratio = ours["per_round_median"] / peer["per_round_median_s"]
        rows.append(
            f"| privfed, {nodes} simulated SuperNodes, {engine} engine | "
            f"{ours['per_round_median']:.3f} s "
            f"(orchestration {ours['orchestration_median']:.3f} s, central evaluation "
            f"{ours['central_evaluation_median']:.3f} s) | {ratio:.2f} | "
            f"{ours['launch_to_exit']:.1f} s | {ours['accuracy']:.2%} "
            f"({ours['epsilon']}) |"
        )
        print(rows[-1], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
