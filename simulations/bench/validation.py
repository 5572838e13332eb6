"""Update validation and robust aggregation, measured in one process.

``cost``: what validating the replies of one round adds to aggregating them. Honest
replies come from real DP-SGD rounds of the ClientApp; the server then aggregates the
same replies with and without validation, interleaved, and the medians are printed
(per reply: :meth:`UpdateValidator.validate` alone).

``robust``: central accuracy after ``--rounds`` rounds on digits with 10 clients, clean
and with 2 colluding attackers (their honest weights plus one fixed direction of norm
``--attack-norm``, within ``max-update-norm``), for every ``aggregation`` rule.

    python -m simulations.bench.validation cost --dataset fashion-mnist --repeats 21
    python -m simulations.bench.validation robust --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.supercore.task_identity import TaskIdentity

from common.config import RunConfig
from common.run_keys import AGGREGATIONS
from common.tasks.models import build_model
from server.app import make_strategy
from server.central_evaluation import CentralEvaluator
from server.checks.update_validation import UpdateValidator
from server.federation_loop import run_rounds
from server.results.client_outcomes import outcome_from_reply
from server.results.run_folder import ResultsWriter
from simulations.launch.in_process_federation import (
    InProcessGrid,
    colluding_push,
    federation,
)


def _honest_round(cfg: RunConfig, clients: int) -> tuple[ArrayRecord, list[Message]]:
    """The global model of round 1 and every client's honest reply to it."""
    grid = InProcessGrid(federation(cfg, range(clients), clients))
    strategy = make_strategy(cfg)
    evaluator = CentralEvaluator(cfg)
    model = build_model(cfg.task, evaluator.num_classes, seed=cfg.seed)
    arrays = ArrayRecord(model.state_dict())
    messages = strategy.configure_train(1, arrays, ConfigRecord(), grid)
    return arrays, grid.pull_messages(grid.push_messages(messages))


def cost(dataset: str, clients: int, repeats: int) -> None:
    """Median seconds to aggregate one round with and without validation."""
    cfg = RunConfig(
        task=dataset, num_rounds=5, target_epsilon=8.0,
        min_train_nodes=clients, min_available_nodes=clients,
        update_compression="none",  # float32 replies: "validation off" cannot decode
    )  # fmt: skip
    started = time.perf_counter()
    arrays, replies = _honest_round(cfg, clients)
    print(f"[bench] {clients} honest replies in {time.perf_counter() - started:.1f} s")
    on, off, per_reply = [], [], []
    for _ in range(repeats):
        for validate in (True, False):
            strategy = make_strategy(cfg)
            if not validate:
                strategy.validator = None
            strategy.round_arrays = arrays
            start = time.perf_counter()
            strategy.aggregate_train(1, replies)
            (on if validate else off).append(time.perf_counter() - start)
            if validate:
                assert all(o.status.value == "trained" for o in strategy.last_outcomes)
        validator = UpdateValidator(cfg)
        outcomes = [outcome_from_reply(r) for r in replies]
        start = time.perf_counter()
        for reply, outcome in zip(replies, outcomes, strict=True):
            validator.validate(1, reply, outcome, arrays)
        per_reply.append((time.perf_counter() - start) / len(replies))
    params = sum(a.numpy().size for a in arrays.values())
    on_ms, off_ms = 1e3 * statistics.median(on), 1e3 * statistics.median(off)
    print("| dataset | parameters | clients | aggregate, validation off | on | "
          "added per round | validate one reply |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {dataset} | {params:,} | {clients} | {off_ms:.2f} ms | {on_ms:.2f} ms | "
        f"{on_ms - off_ms:.2f} ms | {1e3 * statistics.median(per_reply):.3f} ms |"
    )


def robust(rounds: int, attack_norm: float) -> None:
    """Final central accuracy per rule, clean and with 2 of 10 attackers."""
    attack = colluding_push(attack_norm)
    rows = []
    for aggregation in AGGREGATIONS:
        row = [aggregation]
        for tamper in ({}, {100: attack, 101: attack}):
            cfg = RunConfig(
                num_rounds=rounds, target_epsilon=8.0, reproducible_noise=True,
                aggregation=aggregation, krum_byzantine=2,
                min_train_nodes=10, min_available_nodes=10,
                update_compression="none",  # the attackers rewrite float32 weights
            )  # fmt: skip
            evaluator = CentralEvaluator(cfg)
            model = build_model(cfg.task, evaluator.num_classes, seed=cfg.seed)
            with tempfile.TemporaryDirectory() as out:
                result = run_rounds(
                    InProcessGrid(federation(cfg, range(10), 10), tamper), cfg,
                    make_strategy(cfg), ArrayRecord(model.state_dict()), evaluator,
                    ResultsWriter(Path(out), cfg), time.monotonic(),
                )  # fmt: skip
            row.append(f"{100 * evaluator(result.arrays)['accuracy']:.1f} %")
        rows.append(row)
    print("| `aggregation` | clean | 2 of 10 attackers |")
    print("|---|---|---|")
    for row in rows:
        print(f"| `{row[0]}` | {row[1]} | {row[2]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost", help="validation cost per reply and per round")
    c.add_argument("--dataset", default="fashion-mnist")
    c.add_argument("--clients", type=int, default=10)
    c.add_argument("--repeats", type=int, default=21)
    r = sub.add_parser("robust", help="accuracy per aggregation rule, clean / attacked")
    r.add_argument("--rounds", type=int, default=5)
    r.add_argument("--attack-norm", type=float, default=200.0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    # Flower's strategies build messages as the ServerApp process does.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    if args.what == "cost":
        cost(args.dataset, args.clients, args.repeats)
    else:
        robust(args.rounds, args.attack_norm)


if __name__ == "__main__":
    main()
