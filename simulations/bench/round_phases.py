"""Where a client-level round's time goes, phase by phase, with virtual clients.

Runs the ``fmnist-client-eps3`` workload (tanh CNN on pixels, z 0.7129, 10,000 clients
on 2 simulated SuperNodes), or with ``--task flights`` the same recipe over 100,000
clients of the flights records (``simulations.bench.scale``'s, q 0.01, δ 1e-6, the
task's logistic regression), in this process: the real ServerApp round loop and
``VirtualGrid`` over the real ClientApp, without Flower's transport. Each phase
is timed by wrapping the function that does it (measurement only: the wrapped
function runs unchanged). Prints the milliseconds per client of each client-side
phase over rounds 2..T, and each round's training exchange and central evaluation.

    python -m simulations.bench.round_phases --rounds 6
    python -m simulations.bench.round_phases --rounds 5 --task flights
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import client.train_evaluate as client_training
import client.training.vectorised as vectorised
import client.virtual_clients as virtual_clients
import server.messaging as messaging
from common.config import RunConfig
from common.tasks.models import build_model
from common.tasks.registry import get_task
from server.app import make_strategy
from server.central_evaluation import CentralEvaluator
from server.checks.update_validation import UpdateValidator
from server.federation_loop import run_rounds
from server.results.run_folder import ResultsWriter
from server.strategies.client_level import ClientLevelFedAvg
from server.virtual_grid import VirtualGrid
from simulations.launch.in_process_federation import InProcessGrid
from simulations.presets import PRESETS

SUPERNODES = 2
# (clients, run config) of each workload; flights as simulations.bench.scale runs it
WORKLOADS: dict[str, tuple[int, dict[str, Any]]] = {
    "fashion-mnist": (
        10_000, {**PRESETS["fmnist-client-eps3"].run_config, "features": "pixels"}
    ),
    "flights": (
        100_000,
        {
            "task": "flights", "partitioner": "iid", "privacy-mode": "client",
            "local-epochs": 3, "batch-size": 3, "learning-rate": 0.5, "momentum": 0.0,
            "clipping": "fixed", "client-clip-norm": 1.0, "server-learning-rate": 1.0,
            "server-momentum": 0.9, "client-sampling-rate": 0.01, "delta": 1e-6,
            "local-test-fraction": 0.0, "fraction-evaluate": 0.0,
        },
    ),
}  # fmt: skip
# (module, function, label): the phases a group's clients go through
PHASES = (
    (vectorised, "precompute", "batched local training"),
    (virtual_clients, "load_client_shard", "shard (read or built and cached)"),
    (client_training, "_model_from", "handler: model built and loaded"),
    (client_training, "store_ledger", "handler: ledger stored"),
    (client_training, "_setup", "handler: config, node, shard lookup"),
    (client_training.UpdateCodec, "encode", "handler: update encoded"),
    (virtual_clients, "_run_each", "every handler, in all"),
    (messaging, "content_bytes", "server: message bytes counted"),
    (UpdateValidator, "validate", "server: reply validated"),
    (ClientLevelFedAvg, "aggregate_train", "server: replies parsed, validated, aggregated"),
)


def _timed(
    owner: Any, name: str, label: str, totals: dict[str, float], calls: Counter[str]
) -> None:
    inner: Callable[..., Any] = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - started
            calls[label] += 1

    setattr(owner, name, timed)


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--task", choices=sorted(WORKLOADS), default="fashion-mnist")
    args = p.parse_args(argv)
    clients, workload = WORKLOADS[args.task]
    for key, value in {"_run_id": 7, "_node_id": 1, "_task_id": 1}.items():
        setattr(TaskIdentity, key, value)  # what a ServerApp process has
    out = Path(tempfile.mkdtemp(prefix="privfed-phases-")) / "run"
    raw = {
        **workload, "noise-multiplier": 0.7129, "target-epsilon": 0.0,
        "num-rounds": args.rounds, "virtual-clients": clients, "results-dir": str(out),
    }  # fmt: skip
    cfg = RunConfig.from_run_config(raw)
    supernodes = {
        1000 + g: Context(
            run_id=1, node_id=1000 + g,
            node_config={"partition-id": g, "num-partitions": SUPERNODES},
            state=RecordDict(), run_config=cfg.to_run_config(),
        )
        for g in range(SUPERNODES)
    }  # fmt: skip
    evaluator = CentralEvaluator(cfg)
    classes = get_task(cfg.task).num_classes
    initial = ArrayRecord(build_model(cfg.task, classes, seed=cfg.seed).state_dict())
    totals: dict[str, float] = defaultdict(float)
    calls: Counter[str] = Counter()
    for owner, name, label in PHASES:
        _timed(owner, name, label, totals, calls)

    def central(arrays: ArrayRecord) -> dict[str, float]:
        """Round 1 pays the first imports and the data's first read: from its end,
        the phases count afresh (rounds 2..T)."""
        scores = evaluator(arrays)
        if not calls["evaluations"]:
            totals.clear()
            calls.clear()
        calls["evaluations"] += 1
        return scores

    grid = VirtualGrid(InProcessGrid(supernodes), clients)
    run_rounds(
        grid, cfg, make_strategy(cfg, out), initial, central, ResultsWriter(out, cfg), 0.0
    )
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    clients = sum(r["clients_trained"] for r in rounds[1:])
    print(f"rounds 2..{len(rounds)}: {clients} clients trained\n")
    print("| phase | ms per client |\n|---|---|")
    for _, _, label in PHASES:
        print(f"| {label} | {totals[label] / max(clients, 1) * 1000:.2f} |")
    print("\n| round | training exchange | central evaluation |\n|---|---|---|")
    for r in rounds:
        t = r["timing_seconds"]
        exchange, central_s = t["train_exchange"], t["central_evaluation"]
        print(f"| {r['round']} | {exchange:.3f} s | {central_s:.3f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
