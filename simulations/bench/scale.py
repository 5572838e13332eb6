"""Scale: many virtual clients on the simulation engine, with total memory measured.

Runs ``simulations.run`` with N clients on Fashion-MNIST (or digits) and a small
fraction trained per round, samples the summed RSS of the whole process tree
(script, SuperLink, ServerApp, Ray and its workers) every 0.2 s, as RSS and as
PSS (shared pages split between their processes), and checks from
the results that every sampled client trained and every ledger is cumulative.

    python -m simulations.bench.scale --clients 10000 --per-round 100 --rounds 5
    python -m simulations.bench.scale --client-level --clients 60000 --per-round 600

``--client-level`` runs the ``fmnist-client-eps3`` recipe instead (tanh CNN on
pixels, z 0.7129, Poisson q = per-round / clients, δ = 1 / (10·clients)): every
client the server instructs must train.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from common.tasks.registry import task_names
from simulations.launch.processes import process_tree

REPO = Path(__file__).resolve().parents[2]


def tree_memory(pid: int) -> tuple[int, int]:
    """Summed RSS and summed PSS of ``pid`` and its descendants, in bytes.

    RSS counts a page shared by several processes (torch's libraries, forked
    Ray workers) once per process, so its sum overstates the machine's use;
    PSS splits each shared page between the processes sharing it, so its sum
    is the memory the run really holds.
    """
    rss = pss = 0
    for proc in process_tree(pid):
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += info.pss
    return rss, pss


def main(argv: list[str] | None = None) -> int:
    """Run once and print a Markdown row; exit 1 if a check fails."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10000)
    p.add_argument("--per-round", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dataset", default="fashion-mnist", choices=task_names())
    p.add_argument("--data-dir", default="", help="the dataset's files (run key data-dir)")
    p.add_argument("--client-level", action="store_true", help="see the module docstring")
    p.add_argument("--simulated-nodes", type=int, help="as simulations.run's option")
    args = p.parse_args(argv)
    results = Path(tempfile.mkdtemp(prefix="privfed-scale-")) / "run"
    common = [
        sys.executable, "-m", "simulations.run", "--clients", str(args.clients),
        "--rounds", str(args.rounds), "--results-dir", str(results),
        *(["--data-dir", args.data_dir] if args.data_dir else []),
        *(["--simulated-nodes", str(args.simulated_nodes)] if args.simulated_nodes else []),
    ]  # fmt: skip
    if args.client_level:
        argv_run = [
            *common, "--preset", "fmnist-client-eps3", "--set", "features='pixels'",
            "--noise-multiplier", "0.7129", "--delta", str(0.1 / args.clients),
            "--set", f"client-sampling-rate={args.per_round / args.clients}",
        ]  # fmt: skip
    else:
        argv_run = [
            *common, "--dataset", args.dataset,
            "--set", f"fraction-train={args.per_round / args.clients}",
            "--set", f"min-train-nodes={args.per_round}",
            "--set", "fraction-evaluate=0.0",
        ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(argv_run, cwd=REPO, stdout=subprocess.PIPE, text=True)
    peak = peak_pss = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, peak_pss
        while not done.is_set():
            rss, pss = tree_memory(proc.pid)
            peak, peak_pss = max(peak, rss), max(peak_pss, pss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        if "[privfed] round" in line or "[privfed] done" in line:
            print(line.rstrip()[-160:], flush=True)
    code = proc.wait()
    done.set()
    sampler.join()
    wall = time.monotonic() - start
    rounds = [json.loads(x) for x in (results / "rounds.jsonl").read_text().splitlines()]
    trained = [r["clients_trained"] for r in rounds]
    all_sampled_trained = all(
        r["clients_trained"] == len(r["clients"]) and not r.get("dropped") for r in rounds
    ) and (args.client_level or all(t == args.per_round for t in trained))
    # Each released ledger holds every round the client trained in, in whole rounds.
    ledgers_ok = all(
        c["ledger_released"]
        and c["steps_total"] == sum(int(steps) for _, _, steps in c["history"])
        and c["steps_total"] % c["rounds_trained"] == 0
        for r in rounds
        for c in r["clients"]
    )
    print("| clients | per round | rounds | trained per round | ledgers cumulative "
          "| peak total RSS | peak total PSS | wall |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.clients} | {args.per_round} | {len(rounds)} | {trained} | {ledgers_ok} "
          f"| {peak / 1e9:.2f} GB | {peak_pss / 1e9:.2f} GB | {wall:.0f} s |")  # fmt: skip
    return 0 if code == 0 and all_sampled_trained and ledgers_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
