"""Secure aggregation with distributed DP, measured: ε, bytes, round time, accuracy,
and a deployment that loses a SuperNode mid-round.

    python -m simulations.bench_secure_aggregation epsilon
    python -m simulations.bench_secure_aggregation bytes
    python -m simulations.bench_secure_aggregation round-time --clients 100 --repeats 2
    python -m simulations.bench_secure_aggregation accuracy --preset fmnist-client-eps3
    python -m simulations.bench_secure_aggregation dropout --nodes 5

``epsilon`` prints what a dropout costs (the preset's scale); ``bytes`` one round
in process, plain client-level vs secure aggregation, bytes each client sends
(Flower's serialised message objects); ``round-time`` and ``accuracy`` run real
simulations side by side (``simulations.run``) and compare rounds.jsonl/summary.json;
``dropout`` starts a TLS deployment, kills one SuperNode by PID once round 1 is
recorded, and checks that every round still completes.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


# -- epsilon ----------------------------------------------------------------------------
def epsilon_table(
    rounds: int, rate: float, target: float, cohort: int, minimum: int
) -> None:
    """ε by number of uploads per round, and against the server by participations."""
    from common.config import RunConfig
    from common.secagg_plan import plan_for_round, secagg_noise_multiplier
    from common.skellam_accounting import composed_epsilon

    dim = 81 * 7 * 7 * 10 + 10  # the preset's ScatterNet + linear model
    cfg = RunConfig(
        privacy_mode="client", secure_aggregation=True, client_sampling_rate=rate,
        target_epsilon=target, num_rounds=rounds,
        secagg_min_contributors=minimum / cohort,
    )  # fmt: skip
    z = secagg_noise_multiplier(cfg, round(cohort / rate), dim)
    plan = plan_for_round(cfg, dim, z, cohort)
    print(
        f"z {z:.4f} (Skellam, calibrated at m = {minimum} uploads), scale {plan.scale:.1f}"
    )
    print("| uploads per round | effective z | ε after all rounds (skellam-rdp, δ 1e-5) |")
    print("|---|---|---|")
    for k in (minimum, (minimum + cohort) // 2, cohort):
        eps = composed_epsilon([plan.release(k, rate)] * rounds, cfg.delta)
        print(f"| {k} | {plan.effective_noise_multiplier(k):.4f} | {eps:.3f} |")
    print("\n| rounds a client contributed to | ε against the server (no amplification) |")
    print("|---|---|")
    for r in (1, 2, 3, 5):
        eps = composed_epsilon([plan.release(cohort, rate)] * r, cfg.delta, amplified=False)
        print(f"| {r} | {eps:.2f} |")


# -- bytes ------------------------------------------------------------------------------
def bytes_table(clients: int) -> None:
    """One in-process round of each kind per model: bytes each client sends and gets."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import client.app as client_app
    from common.config import RunConfig
    from common.distributed_dp import plan_round
    from common.models import build_model, count_parameters
    from server.client_outcomes import outcome_from_reply
    from server.messaging import content_bytes
    from server.secure_aggregation import SecAggRound, round_layout
    from simulations.in_process_federation import InProcessGrid, delivered, federation

    for key, value in {"_run_id": 1, "_node_id": 1, "_task_id": 1}.items():
        setattr(TaskIdentity, key, value)
    print("| model | parameters | float32 update | plain client-level, up | secure "
          "aggregation, up (all stages) | ratio | secure aggregation, down |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for dataset, features in (("digits", "pixels"), ("fashion-mnist", "pixels"),
                              ("fashion-mnist", "scattering")):  # fmt: skip
        common = dict(
            dataset=dataset, features=features, privacy_mode="client",
            client_sampling_rate=1.0, noise_multiplier=1.0, target_epsilon=0.0,
            delta=1e-3, min_available_nodes=clients, min_train_nodes=2,
        )  # fmt: skip
        model = build_model(dataset, features=features, seed=0)
        arrays = ArrayRecord(model.state_dict())
        dim = count_parameters(model)
        config = ConfigRecord({"server-round": 1, "clip-norm": 1.0})
        plain_cfg = RunConfig(  # float32 updates, as this table's "plain" means
            **common, update_compression="none", results_dir=tempfile.mkdtemp()
        )  # type: ignore[arg-type]
        contexts = federation(plain_cfg, range(clients), clients)
        node = next(iter(contexts))
        msg = delivered(RecordDict({"arrays": arrays, "config": config}), "train", node)
        plain_up = content_bytes(client_app.app(msg, contexts[node]).content)
        cfg = RunConfig(**common, secure_aggregation=True, results_dir=tempfile.mkdtemp())  # type: ignore[arg-type]
        contexts = federation(cfg, range(clients), clients)
        layout = round_layout(list(contexts), cfg, random.Random(0))
        plan = plan_round(dim, 1.0, 1.0, clients, layout.min_contributors, 16)
        protocol = SecAggRound(
            InProcessGrid(contexts), 1, layout, plan, secrets.token_bytes(32), 60, 600,
            time.monotonic,
        )  # fmt: skip
        result = protocol.run(
            lambda n, a=arrays, c=config: RecordDict({"arrays": a, "config": c}),
            outcome_from_reply,
        )
        up = statistics.median(result.bytes_up.values())
        down = statistics.median(result.bytes_down.values())
        print(f"| {dataset}, {features} | {dim:,} | {dim * 4:,} | {plain_up:,} | "
              f"{up:,.0f} | {up / plain_up:.2f}× | {down:,.0f} |")  # fmt: skip


# -- real simulations -------------------------------------------------------------------
def _run(args: list[str], out: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "simulations.run", *args, "--results-dir", str(out),
            "--timeout", "7200"]  # fmt: skip
    print(f"[bench] {' '.join(argv[2:])}", flush=True)
    code = subprocess.call(argv, cwd=REPO, stdout=subprocess.DEVNULL)
    if code != 0:
        raise SystemExit(f"[bench] run exited {code}: {out}")
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    return {"rounds": rounds, "summary": json.loads((out / "summary.json").read_text())}


def round_time(clients: int, rounds: int, repeats: int) -> None:
    """Plain client-level vs secure aggregation, every client in every round,
    interleaved; median round seconds after the first round (warm-up)."""
    work = Path(tempfile.mkdtemp(prefix="privfed-bench-secagg-time-"))
    base = ["--clients", str(clients), "--rounds", str(rounds),
            "--privacy-mode", "client", "--set", "client-sampling-rate=1.0",
            "--target-epsilon", "8"]  # fmt: skip
    seconds: dict[str, list[float]] = {"plain": [], "secure aggregation": []}
    for i in range(repeats):
        for name, extra in (("plain", []), ("secure aggregation",
                            ["--set", "secure-aggregation=true"])):  # fmt: skip
            run = _run([*base, *extra], work / f"{name.replace(' ', '-')}-{i}")
            seconds[name] += [r["seconds"] for r in run["rounds"][1:]]
    plain = statistics.median(seconds["plain"])
    secure = statistics.median(seconds["secure aggregation"])
    print(
        f"| {clients} clients per round, digits | plain {plain:.2f} s | secure "
        f"aggregation {secure:.2f} s | {secure / plain:.2f}× | rounds 2–{rounds} of "
        f"{repeats} runs each |"
    )


def accuracy(preset: str, minimum: float) -> None:
    """The preset, central client-level vs secure aggregation, one after the other."""
    work = Path(tempfile.mkdtemp(prefix="privfed-bench-secagg-acc-"))
    runs = {
        "central": _run(["--preset", preset], work / "central"),
        "secure aggregation": _run(
            ["--preset", preset, "--set", "secure-aggregation=true",
             "--set", f"secagg-min-contributors={minimum}"],
            work / "secagg",
        ),
    }  # fmt: skip
    print(
        "| preset | mode | accuracy | client-level ε | ε against the server | bytes up "
        "per client per round (median) | round seconds (median) | wall |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        summary = run["summary"]
        block = summary["client_level"]
        sa = block.get("secure_aggregation") or {}
        per_round = statistics.median(r["seconds"] for r in run["rounds"])
        print(
            f"| {preset} | {name} | {summary['final_central']['accuracy']:.4f} | "
            f"{block['epsilon']:.3f} ({block['accountant']}) | "
            f"{sa.get('epsilon_against_server', '—')} | "
            f"{sa.get('bytes_up_per_client_per_round_median', '—')} | {per_round:.1f} | "
            f"{summary['wall_seconds'] / 60:.1f} min |"
        )


# -- a deployment that loses a node -------------------------------------------------
def dropout(nodes: int, rounds: int) -> int:
    """TLS deployment of ``nodes`` SuperNodes; one is killed once round 1 is recorded."""
    import tomli_w

    from common.config import RunConfig
    from simulations.deploy import write_node_policy
    from simulations.deployment import DeploymentSpec, LocalDeployment
    from simulations.processes import become_subreaper, descendants, stop_processes
    from simulations.run_options import APP_DIR, pyproject_defaults

    become_subreaper()
    work = Path(tempfile.mkdtemp(prefix="privfed-bench-secagg-drop-"))
    results = work / "results"
    overrides = {
        "privacy-mode": "client", "secure-aggregation": True,
        "client-sampling-rate": 1.0, "target-epsilon": 8.0, "num-rounds": rounds,
        "secagg-min-contributors": 0.6, "secagg-timeout": 600.0,
        "round-timeout": 900.0, "min-available-nodes": nodes, "min-train-nodes": 2,
        "results-dir": str(results),
    }  # fmt: skip
    run_config = work / "run.toml"
    run_config.write_text(tomli_w.dumps(overrides))
    cfg = RunConfig.from_run_config({**pyproject_defaults(), **overrides})
    states = {i: results / "nodes" / f"node-{i}" for i in range(nodes)}
    for state in states.values():
        write_node_policy(state, cfg)
    deployment = LocalDeployment(DeploymentSpec(work / "work", work / "certs"))
    started = time.monotonic()
    try:
        deployment.start_superlink()
        for i in range(nodes):
            config = {
                "partition-id": i,
                "num-partitions": nodes,
                "state-dir": str(states[i]),
            }
            deployment.start_supernode(i, config, deployment.node_key(i))
        flwr_run = deployment.run_app(run_config, APP_DIR)
        path = results / "rounds.jsonl"
        print(f"[bench] {nodes} SuperNodes up; waiting for round 1", flush=True)
        while not (path.exists() and path.read_text().strip()):
            if flwr_run.poll() is not None:
                raise SystemExit("[bench] the run ended before round 1")
            time.sleep(0.5)
        victim = nodes - 1
        deployment.kill_supernode(victim)
        killed_at = time.time()
        print(f"[bench] killed SuperNode {victim} after round 1", flush=True)
        flwr_run.communicate(timeout=3600)
    finally:
        deployment.close()
        stop_processes(list(descendants()))  # the flwr CLI and anything it left
    summary = json.loads((results / "summary.json").read_text())
    print("| round | started after the kill | cohort | uploads summed | lost at stage | "
          "unmasked | ε (skellam-rdp) | round seconds |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    unmasked = 0
    for line in path.read_text().splitlines():
        record = json.loads(line)
        sa = record["client_level"]["secure_aggregation"]
        unmasked += bool(sa["unmasked"])
        lost = {k: len(v) for k, v in sa.get("dropped", {}).items() if v}
        outcome = "yes" if sa["unmasked"] else sa.get("failure")
        after = record["started_at"] > killed_at
        print(f"| {record['round']} | {after} | {sa['cohort']} | "
              f"{sa.get('contributors', 0)} | {lost or '—'} | {outcome} | "
              f"{record['max_epsilon']} | {record['seconds']:.0f} |")  # fmt: skip
    print(
        f"status {summary['status']}, {summary['rounds_completed']} of {rounds} rounds, "
        f"{time.monotonic() - started:.0f} s"
    )
    return 0 if summary["status"] == "completed" and unmasked == rounds else 1


def main(argv: list[str] | None = None) -> int:
    """Parse the subcommand and run it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("epsilon", help="what a dropout costs, ε against the server")
    e.add_argument("--rounds", type=int, default=100)
    e.add_argument("--rate", type=float, default=0.01)
    e.add_argument("--target", type=float, default=3.0)
    e.add_argument("--cohort", type=int, default=100)
    e.add_argument("--minimum", type=int, default=90)
    b = sub.add_parser("bytes", help="bytes per client per round, in process")
    b.add_argument("--clients", type=int, default=10)
    t = sub.add_parser("round-time", help="round time, plain vs secure aggregation")
    t.add_argument("--clients", type=int, default=100)
    t.add_argument("--rounds", type=int, default=4)
    t.add_argument("--repeats", type=int, default=2)
    a = sub.add_parser("accuracy", help="a client-level preset, central vs distributed")
    a.add_argument("--preset", default="fmnist-client-eps3")
    a.add_argument("--min-contributors", type=float, default=0.95)
    d = sub.add_parser("dropout", help="a deployment that loses a SuperNode mid-run")
    d.add_argument("--nodes", type=int, default=5)
    d.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.what == "epsilon":
        epsilon_table(args.rounds, args.rate, args.target, args.cohort, args.minimum)
    elif args.what == "bytes":
        bytes_table(args.clients)
    elif args.what == "round-time":
        round_time(args.clients, args.rounds, args.repeats)
    elif args.what == "accuracy":
        accuracy(args.preset, args.min_contributors)
    else:
        return dropout(args.nodes, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
