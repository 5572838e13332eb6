"""What secure aggregation's consistency check costs per round: time and bytes.

    python -m simulations.bench.secagg_consistency --clients 100 --model fmnist-scattering

One in-process round (real ClientApps behind an in-process grid, so each exchange's
time includes the clients' work) at the preset's cohort (fmnist-client-eps3: about
100 clients per round, k = 15 shares, m = 95 % of the cohort). The check's cost is
measured inside that round and set beside the rest of it:

- bytes: the certificates and advert signatures in setup replies, every
  participant's signed advertisement in each share-keys instruction, the
  consistency stage both ways, and the signatures in each unmask instruction;
- seconds: the consistency exchange, plus the time the clients spent elsewhere
  checking certificates and signatures and signing (timed around those calls).

"Without it" is the same round minus those bytes and seconds; a round without the
check no longer exists in the code, so it is not run separately.
"""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulations.bench.secure_aggregation import MODELS


def _timed(owner: Any, name: str, spent: list[float]) -> None:
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    setattr(owner, name, wrapper)


def measure(clients: int, model: str, shares: int, minimum: float) -> dict[str, Any]:
    """One round; its per-stage seconds and bytes and the check's part of them."""
    import os

    from flwr.app import ArrayRecord, ConfigRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import client.secure_aggregation.handlers as handlers
    import client.secure_aggregation.stages as stages
    from common.config import RunConfig
    from common.secure_aggregation.distributed_dp import plan_skellam_round
    from common.secure_aggregation.identity import NodeIdentity
    from common.secure_aggregation.plan import public_minimum
    from common.secure_aggregation.protocol import Stage
    from common.tasks.models import build_model, count_parameters
    from server.results.client_outcomes import outcome_from_reply
    from server.secure_aggregation.round import SecAggRound, round_layout
    from simulations.launch.dealer import trusted_dealer
    from simulations.launch.in_process_federation import InProcessGrid, federation

    for key, value in {"_run_id": 1, "_node_id": 1, "_task_id": 1}.items():
        setattr(TaskIdentity, key, value)
    trusted_dealer(os.environ, Path(tempfile.mkdtemp()), clients)  # type: ignore[arg-type]
    spent: list[float] = []
    for owner, name in (
        (stages, "verify_adverts"),
        (stages, "verified_signers"),
        (stages, "uploaders_to_sign"),
        (handlers, "node_identity"),
        (NodeIdentity, "sign"),
    ):
        _timed(owner, name, spent)
    dataset, features = MODELS[model]
    cfg = RunConfig(
        task=dataset, features=features, privacy_mode="client", secure_aggregation=True,
        client_sampling_rate=1.0, noise_multiplier=1.0, target_epsilon=0.0, delta=1e-5,
        min_available_nodes=clients, min_train_nodes=2, secagg_num_shares=shares,
        secagg_min_contributors=minimum, results_dir=tempfile.mkdtemp(),
    )  # fmt: skip
    net = build_model(dataset, features=features, seed=0)
    arrays = ArrayRecord(net.state_dict())
    config = ConfigRecord({"server-round": 1, "clip-norm": 1.0})
    contexts = federation(cfg, range(clients), clients)
    layout = round_layout(
        list(contexts), cfg, random.Random(0), public_minimum(cfg, clients)
    )
    plan = plan_skellam_round(
        count_parameters(net), 1.0, 1.0, clients, layout.min_contributors, 16
    )
    content: Callable[[int], RecordDict] = lambda n: RecordDict(  # noqa: E731
        {"arrays": arrays, "config": config}
    )
    protocol = SecAggRound(
        InProcessGrid(contexts), 1, layout, plan, secrets.token_bytes(32), 600, 600,
        time.monotonic,
    )  # fmt: skip
    result = protocol.run(content, outcome_from_reply)
    if result.failure:
        raise SystemExit(f"[bench] the round failed: {result.failure}")
    check_seconds = result.stage_seconds[Stage.CONSISTENCY.value] + sum(spent)
    total_bytes = sum(b["up"] + b["down"] for b in result.stage_bytes.values())
    check_bytes = sum(result.identity_bytes.values())
    return {
        "clients": clients,
        "model": model,
        "threshold": layout.threshold,
        "min_contributors": layout.min_contributors,
        "round_seconds": result.exchange_seconds,
        "check_seconds": check_seconds,
        "round_bytes": total_bytes,
        "check_bytes": check_bytes,
        "check_bytes_by_part": dict(result.identity_bytes),
        "bytes_down_median": statistics.median(result.bytes_down.values()),
        "bytes_up_median": statistics.median(result.bytes_up.values()),
        "stage_seconds": dict(result.stage_seconds),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure and print one row (and the stages)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=100, help="the cohort (preset: ~100)")
    p.add_argument("--model", choices=list(MODELS), default="fmnist-scattering")
    p.add_argument("--shares", type=int, default=15, help="secagg-num-shares")
    p.add_argument("--min-contributors", type=float, default=0.95)
    args = p.parse_args(argv)
    r = measure(args.clients, args.model, args.shares, args.min_contributors)
    without_s = r["round_seconds"] - r["check_seconds"]
    without_b = r["round_bytes"] - r["check_bytes"]
    n = r["clients"]
    print("| cohort, model | t, m | round without the check | with it | added |")
    print("|---|---|---|---|---|")
    print(
        f"| {n}, {r['model']} | {r['threshold']}, {r['min_contributors']} | "
        f"{without_s:.2f} s, {without_b / n / 1e3:,.1f} kB per client | "
        f"{r['round_seconds']:.2f} s, {r['round_bytes'] / n / 1e3:,.1f} kB per client | "
        f"+{r['check_seconds']:.2f} s ({100 * r['check_seconds'] / without_s:.1f} %), "
        f"+{r['check_bytes'] / n / 1e3:,.1f} kB per client "
        f"({100 * r['check_bytes'] / without_b:.1f} %) |"
    )
    print("check bytes by part (all clients): " + ", ".join(
        f"{k} {v:,}" for k, v in r["check_bytes_by_part"].items()
    ))  # fmt: skip
    print("stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["stage_seconds"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
