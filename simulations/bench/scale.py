"""Scale: many virtual clients on the simulation engine, with total memory measured.

Runs ``simulations.run`` with N clients on Fashion-MNIST (or digits) and a small
fraction trained per round, samples the summed memory of the whole process tree
(script, SuperLink, ServerApp, Ray and its workers) as RSS every 0.2 s and as
PSS (shared pages split between their processes) every second, and checks from
the results that every sampled client trained and every ledger is cumulative.

    python -m simulations.bench.scale --clients 10000 --per-round 100 --rounds 5
    python -m simulations.bench.scale --client-level --clients 60000 --per-round 600
    python -m simulations.bench.scale --client-level --dataset flights \
        --clients 100000 --per-round 1000 --pfl-python /tmp/pflvenv/bin/python

``--client-level`` runs the ``fmnist-client-eps3`` recipe instead (tanh CNN on
pixels, z 0.7129, Poisson q = per-round / clients, δ = 1 / (10·clients)): every
client the server instructs must train. On a tabular task (``flights``: 261,876
training records, enough for 100,000 clients) it runs the same local and central
settings with the task's logistic regression. ``--pfl-python`` then also runs Apple's
pfl (:mod:`simulations.bench.pfl_peer`, in its own venv) on the very same records and
shards, cohort = per-round, and prints its row beside privfed's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from common.tasks.registry import get_task, task_names
from simulations.bench.peer_comparison import NOISE, run_peer
from simulations.launch.processes import process_tree

REPO = Path(__file__).resolve().parents[2]
SEED = 42  # the run config's default seed: the shards privfed's clients get
# fmnist-client-eps3's local and central settings, for a task without a preset of its own
_CLIENT_LEVEL_KEYS = (
    "--partitioner", "iid", "--privacy-mode", "client", "--local-epochs", "3",
    "--batch-size", "3", "--learning-rate", "0.5", "--momentum", "0.0",
    "--set", "clipping='fixed'", "--set", "client-clip-norm=1.0",
    "--set", "server-learning-rate=1.0", "--set", "server-momentum=0.9",
    "--set", "local-test-fraction=0.0", "--set", "fraction-evaluate=0.0",
)  # fmt: skip


SAMPLE_S = 0.2  # seconds between RSS samples
PSS_EVERY = 5  # samples between PSS samples and listings of the process tree (1 s)


def tree_memory(procs: list[psutil.Process], with_pss: bool) -> tuple[int, int]:
    """Summed RSS and (``with_pss``, else 0) summed PSS of ``procs`` (a run's process
    tree), in bytes.

    RSS counts a page shared by several processes (torch's libraries, forked
    Ray workers) once per process, so its sum overstates the machine's use;
    PSS splits each shared page between the processes sharing it, so its sum
    is the memory the run really holds. PSS costs the kernel a walk of each
    process's page tables: sampled every 0.2 s it took 16 % of a core beside the
    run it measures (5.6–5.8 CPU-s in 36–38 s at 100,000 clients), and the run's
    rounds took 1.45–1.47 s against 1.26–1.41 s sampled every second.
    """
    rss = pss = 0
    for proc in procs:
        try:
            if with_pss:
                info = proc.memory_full_info()
                pss += info.pss
            else:
                info = proc.memory_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
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
    p.add_argument("--engine", choices=["process", "ray"], help="as simulations.run's")
    p.add_argument("--pfl-python", help="python of a venv with pfl 0.6.0 (tabular tasks)")
    args = p.parse_args(argv)
    if args.pfl_python and not (args.client_level and _is_tabular(args.dataset)):
        p.error(
            "--pfl-python needs --client-level on a tabular task (flights, lending-club, "
            "nwtco); the Fashion-MNIST peer is simulations.bench.peer_comparison"
        )
    results = Path(tempfile.mkdtemp(prefix="privfed-scale-")) / "run"
    common = [
        sys.executable, "-m", "simulations.run", "--clients", str(args.clients),
        "--rounds", str(args.rounds), "--results-dir", str(results),
        *(["--data-dir", args.data_dir] if args.data_dir else []),
        *(["--simulated-nodes", str(args.simulated_nodes)] if args.simulated_nodes else []),
        *(["--engine", args.engine] if args.engine else []),
    ]  # fmt: skip
    if args.client_level:
        recipe = (
            ("--task", args.dataset, *_CLIENT_LEVEL_KEYS)
            if _is_tabular(args.dataset)
            else ("--preset", "fmnist-client-eps3", "--set", "features='pixels'")
        )
        argv_run = [
            *common, *recipe,
            "--noise-multiplier", str(NOISE), "--delta", str(0.1 / args.clients),
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
    sampler_cpu = 0.0
    done = threading.Event()

    def sample() -> None:
        """RSS every 0.2 s; PSS, and the tree's new processes, every second."""
        nonlocal peak, peak_pss, sampler_cpu
        started, procs, count = time.thread_time(), [], 0
        while not done.is_set():
            every_second = count % PSS_EVERY == 0
            if every_second:
                procs = process_tree(proc.pid)
            rss, pss = tree_memory(procs, with_pss=every_second)
            peak, peak_pss = max(peak, rss), max(peak_pss, pss)
            count += 1
            done.wait(SAMPLE_S)
        sampler_cpu = time.thread_time() - started

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
    per_round = statistics.median(r["seconds"] for r in rounds[1:] or rounds)
    central = rounds[-1].get("central", {})
    quality = ", ".join(
        f"{k} {central[k]:.4f}" for k in ("accuracy", "auroc") if k in central
    )
    print("| system | clients | per round | rounds | trained per round | ledgers "
          "cumulative | peak total RSS | peak total PSS | per round (median, 2..T) "
          "| after the last round | wall |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| privfed | {args.clients} | {args.per_round} | {len(rounds)} | {trained} "
          f"| {ledgers_ok} | {peak / 1e9:.2f} GB | {peak_pss / 1e9:.2f} GB "
          f"| {per_round:.2f} s | {quality} | {wall:.0f} s |", flush=True)  # fmt: skip
    print(f"memory sampler: {sampler_cpu:.1f} CPU-s over {wall:.0f} s", flush=True)
    ok = code == 0 and all_sampled_trained and ledgers_ok
    if args.pfl_python:
        peer = _pfl(args, results.parent / "records.npz")
        print(f"| pfl 0.6.0 | {peer['clients']} | {args.per_round} (fixed cohort) "
              f"| {peer['rounds']} | — | — | {peer['peak_rss_bytes'] / 1e9:.2f} GB | — "
              f"| {peer['per_round_median_s']:.2f} s | accuracy {peer['accuracy'][-1]:.4f} "
              f"| {peer['launch_to_exit_s']:.0f} s |")  # fmt: skip
        print(f"privfed / pfl per round: {per_round / peer['per_round_median_s']:.2f}")
    return 0 if ok else 1


def _is_tabular(task_name: str) -> bool:
    return len(get_task(task_name).input_shape) == 1


def write_records(task_name: str, data_dir: str, clients: int, npz: Path) -> None:
    """Write the training records, privfed's IID shards of them over ``clients``
    (the run's seed) and the central test set to ``npz``, for the peer to read."""
    import numpy as np

    from common.data.partitioning import PartitionSpec, partition_indices

    task = get_task(task_name)
    x, y, _ = task.raw_with_sites("train", data_dir, SEED)
    x_test, y_test = task.raw("test", data_dir, SEED)
    shards = partition_indices(
        np.asarray(y), PartitionSpec("iid", clients, SEED), task.num_classes
    )
    offsets = np.cumsum([0, *(len(s) for s in shards)])
    np.savez(
        npz, x_train=np.asarray(x, np.float32), y_train=np.asarray(y, np.int64),
        x_test=np.asarray(x_test, np.float32), y_test=np.asarray(y_test, np.int64),
        shard_offsets=offsets, shard_indices=np.concatenate(shards),
        num_classes=task.num_classes,
    )  # fmt: skip


def _pfl(args: argparse.Namespace, npz: Path) -> dict[str, Any]:
    """Run pfl on privfed's own records and IID shards (``npz``), cohort per-round."""
    write_records(args.dataset, args.data_dir, args.clients, npz)
    return run_peer(
        args.pfl_python, "--records", str(npz), "--rounds", str(args.rounds),
        "--cohort", str(args.per_round), "--noise-multiplier", str(NOISE),
        timeout=7200,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
