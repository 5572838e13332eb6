"""A local deployment with warm ClientApp processes against the same one started cold,
or with woken SuperExecs against polling ones.

Runs ``simulations.deploy`` (TLS + SuperNode authentication; digits) alternately with
the defaults (each node's ClientApp processes forked from a warm template, an idle
node asking again after 0.5 s: docs/deployment.md) and with ``--cold-clientapp``
(Flower's stock start of every ClientApp process; the 0.5 s pull pace stays),
``--repeats`` times each, and
prints per variant the medians of the command's wall seconds, the CPU seconds of
the whole process tree (user + system of every process the deployment started and
reaped: it is their subreaper) and the mean round time from ``rounds.jsonl``.

    python -m simulations.bench.warm_clientapp --clients 3 --rounds 2 --repeats 3
    python -m simulations.bench.warm_clientapp --clients 3 --rounds 2 --repeats 3 \
        --secure-aggregation
    python -m simulations.bench.warm_clientapp --clients 3 --rounds 2 --repeats 3 \
        --baseline polling

``--baseline polling`` compares the defaults with ``--polling-superexecs`` instead
(every SuperExec asking for a task every 0.1 s, as Flower's do, rather than woken
when one is stored: launch/superexec_wakeup.py).

CPU seconds hold on a shared machine; wall seconds do not, hence the alternation.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINES = {"cold": ["--cold-clientapp"], "polling": ["--polling-superexecs"]}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(args: argparse.Namespace, extra: list[str], results: Path) -> dict[str, float]:
    """One deployment; its wall and tree CPU seconds and mean round seconds."""
    command = [
        sys.executable, "-m", "simulations.deploy", "--clients", str(args.clients),
        "--rounds", str(args.rounds), "--results-dir", str(results),
        "--set", "fraction-evaluate=0.0", *extra,
    ]  # fmt: skip
    if args.secure_aggregation:  # client-level DP, every client in every round
        command += [
            "--privacy-mode", "client", "--target-epsilon", "8",
            "--set", "secure-aggregation=true", "--set", "client-sampling-rate=1.0",
        ]  # fmt: skip
    cpu0, wall0 = _children_cpu(), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    wall, cpu = time.perf_counter() - wall0, _children_cpu() - cpu0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}")
    rounds = [
        json.loads(line)
        for line in (results / "rounds.jsonl").read_text().splitlines()
        if line.strip()
    ]
    walls = [r["seconds"] for r in rounds if "seconds" in r]
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "round_s": statistics.mean(walls) if walls else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    """Alternate the variants; print their medians as a Markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--secure-aggregation", action="store_true")
    p.add_argument("--timeout", type=float, default=900.0, help="per deployment, s")
    p.add_argument("--baseline", choices=sorted(BASELINES), default="cold")
    args = p.parse_args(argv)
    variants = {"defaults": [], args.baseline: BASELINES[args.baseline]}
    seen: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="privfed-bench-warm-") as work:
        for repeat in range(args.repeats):
            for name, extra in variants.items():
                out = Path(work) / f"{name}-{repeat}"
                figures = run_once(args, extra, out)
                seen[name].append(figures)
                print(
                    f"[bench] {name} {repeat + 1}/{args.repeats}: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()),
                    flush=True,
                )
    print("\n| variant | wall s | CPU s (process tree) | round s |")
    print("|---|---|---|---|")
    for name, runs in seen.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"| {name} | {med['wall_s']:.1f} | {med['cpu_s']:.1f} | {med['round_s']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
