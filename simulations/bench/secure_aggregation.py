"""Secure aggregation with distributed DP, measured: ε, bytes, round time, accuracy,
and a deployment that loses a SuperNode mid-round.

    python -m simulations.bench.secure_aggregation epsilon
    python -m simulations.bench.secure_aggregation bytes
    python -m simulations.bench.secure_aggregation round-time --clients 100 --repeats 2
    python -m simulations.bench.secure_aggregation round-time --preset fmnist-client-eps3
    python -m simulations.bench.secure_aggregation accuracy --preset fmnist-client-eps3
    python -m simulations.bench.secure_aggregation dropout --nodes 5

``epsilon`` prints what a dropout costs (the preset's scale); ``bytes`` one round
in process, plain client-level vs secure aggregation, bytes each client sends
(Flower's serialised message objects); ``round-time`` and ``accuracy`` run real
simulations side by side (``simulations.run``) and compare rounds.jsonl/summary.json;
``dropout`` starts a TLS deployment, kills one SuperNode by PID during a stage of
round 2 (``--stage``), and checks that every round still completes.
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

import psutil

REPO = Path(__file__).resolve().parents[2]


# -- epsilon ----------------------------------------------------------------------------
def epsilon_table(
    rounds: int, rate: float, target: float, cohort: int, minimum: int
) -> None:
    """ε by number of uploads per round, and against the server by participations."""
    from common.config import RunConfig
    from common.secure_aggregation.plan import plan_for_run, secagg_noise_multiplier
    from common.secure_aggregation.skellam_accounting import composed_epsilon

    dim = 81 * 7 * 7 * 10 + 10  # the preset's ScatterNet + linear model
    cfg = RunConfig(
        privacy_mode="client", secure_aggregation=True, client_sampling_rate=rate,
        target_epsilon=target, num_rounds=rounds,
        secagg_min_contributors=minimum / cohort,
    )  # fmt: skip
    z = secagg_noise_multiplier(cfg, round(cohort / rate), dim)
    plan = plan_for_run(cfg, dim, z, round(cohort / rate))
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
MODELS = {  # name: (dataset, features)
    "digits": ("digits", "pixels"),
    "fmnist-cnn": ("fashion-mnist", "pixels"),
    "fmnist-scattering": ("fashion-mnist", "scattering"),
}


def bytes_table(clients: int, models: list[str]) -> None:
    """One in-process round of each kind per model: bytes each client sends and gets."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import client.app as client_app
    from common.config import RunConfig
    from common.secure_aggregation.distributed_dp import plan_skellam_round
    from common.secure_aggregation.plan import public_minimum
    from common.tasks.models import build_model, count_parameters
    from server.messaging import content_bytes
    from server.results.client_outcomes import outcome_from_reply
    from server.secure_aggregation.round import SecAggRound, round_layout
    from simulations.launch.in_process_federation import (
        InProcessGrid,
        delivered,
        federation,
    )

    for key, value in {"_run_id": 1, "_node_id": 1, "_task_id": 1}.items():
        setattr(TaskIdentity, key, value)
    _deal(clients)
    print("| model | parameters | float32 update | plain client-level, up | secure "
          "aggregation, up (all stages) | ratio | secure aggregation, down |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for dataset, features in (MODELS[m] for m in models):
        common = dict(
            task=dataset, features=features, privacy_mode="client",
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
        layout = round_layout(
            list(contexts), cfg, random.Random(0), public_minimum(cfg, clients)
        )
        plan = plan_skellam_round(dim, 1.0, 1.0, clients, layout.min_contributors, 16)
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


def _deal(clients: int) -> None:
    """Be the trusted dealer of the in-process nodes' identities."""
    import os

    from simulations.launch.dealer import trusted_dealer

    trusted_dealer(os.environ, Path(tempfile.mkdtemp()), clients)  # type: ignore[arg-type]


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


def round_time(clients: int, rounds: int, repeats: int, preset: str | None) -> None:
    """Plain (central) client-level vs secure aggregation, interleaved; median round
    seconds after the first round (warm-up), and the median of each stage.

    Without ``preset``: digits, ``clients`` clients, every client in every round.
    With one: the preset's federation and cohort (e.g. fmnist-client-eps3, about
    100 of 10,000 clients per round), secure aggregation as in ``accuracy``."""
    work = Path(tempfile.mkdtemp(prefix="privfed-bench-secagg-time-"))
    if preset is None:
        base = ["--clients", str(clients), "--privacy-mode", "client",
                "--set", "client-sampling-rate=1.0", "--target-epsilon", "8"]  # fmt: skip
        secure_extra = ["--set", "secure-aggregation=true"]
    else:
        base = ["--preset", preset]
        # m = 80 of the expected 100: a Poisson cohort falls short (and the round
        # releases nothing) in about 2 % of rounds; m barely changes the round's time
        secure_extra = ["--set", "secure-aggregation=true",
                        "--set", "secagg-min-contributors=0.8"]  # fmt: skip
    base += ["--rounds", str(rounds)]
    seconds: dict[str, list[float]] = {"plain": [], "secure aggregation": []}
    stages: dict[str, list[float]] = {}
    cohorts: list[int] = []
    for i in range(repeats):
        for name, extra in (("plain", []), ("secure aggregation", secure_extra)):
            run = _run([*base, *extra], work / f"{name.replace(' ', '-')}-{i}")
            for record in run["rounds"][1:]:
                seconds[name].append(record["seconds"])
                sa = (record.get("client_level") or {}).get("secure_aggregation")
                if sa and not sa.get("unmasked", True):
                    seconds[name].pop()  # a round that released nothing is not timed
                    continue
                if sa:
                    cohorts.append(sa["cohort"])
                    for stage, value in sa["stage_seconds"].items():
                        stages.setdefault(stage, []).append(value)
                    server = record["timing_seconds"]["aggregation"]
                    stages.setdefault("server unmask and sum", []).append(server)
    plain = statistics.median(seconds["plain"])
    secure = statistics.median(seconds["secure aggregation"])
    what = preset or "digits"
    print(
        f"| {what}, cohort median {statistics.median(cohorts):.0f} | plain {plain:.2f} s "
        f"| secure aggregation {secure:.2f} s | {secure / plain:.2f}× | rounds 2–{rounds} "
        f"of {repeats} runs each |"
    )
    print("stages (median s): " + ", ".join(
        f"{k} {statistics.median(v):.2f}" for k, v in stages.items()
    ))  # fmt: skip


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
# The stages of a round in the order a node gets their messages (one process each).
STAGE_ORDER = ("setup", "share_keys", "masked_update", "consistency", "unmask")


def _clientapps(node: psutil.Process) -> set[int]:
    """PIDs of the ``flwr-clientapp`` processes a SuperNode runs now."""
    found = set()
    try:
        children = node.children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for child in children:
        try:
            if any(Path(a).name == "flwr-clientapp" for a in child.cmdline()[:2]):
                found.add(child.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _kill_at_stage(deployment: Any, victim: int, stage: str, flwr_run: Any) -> None:
    """Kill SuperNode ``victim`` once its ClientApp for ``stage`` of the next round
    has started (round 1 recorded, so the next processes are round 2's, in order)."""
    node = psutil.Process(deployment.nodes[victim].process.pid)
    seen = _clientapps(node)  # round 1's last, if still exiting
    started: list[int] = []
    while len(started) <= STAGE_ORDER.index(stage):
        if flwr_run.poll() is not None:
            raise SystemExit(f"[bench] the run ended before stage {stage} of round 2")
        now = _clientapps(node)
        started += sorted(now - seen - set(started))
        seen |= now
        time.sleep(0.05)
    deployment.kill_supernode(victim)


def dropout(nodes: int, rounds: int, stage: str) -> int:
    """TLS deployment of ``nodes`` SuperNodes; one is killed in round 2, once its
    ClientApp for ``stage`` has started (``masked_update``: after it shared its keys,
    before its upload, the case SecAgg+ recovers by revealing its key's shares)."""
    import tomli_w

    from common.config import RunConfig
    from simulations.deploy import write_node_policy
    from simulations.deployment.certificates import default_ca_dir
    from simulations.deployment.deployment_spec import DeploymentSpec
    from simulations.deployment.local import LocalDeployment
    from simulations.deployment.node_identity import ensure_node_identity
    from simulations.launch.options import APP_DIR, pyproject_defaults
    from simulations.launch.processes import become_subreaper, descendants, stop_processes

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
    for i, state in states.items():
        write_node_policy(state, cfg)
        ensure_node_identity(state, default_ca_dir(), f"node-{i}")
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
        _kill_at_stage(deployment, victim, stage, flwr_run)
        killed_at = time.time()
        print(f"[bench] killed SuperNode {victim} in round 2, stage {stage}", flush=True)
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
    b.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    t = sub.add_parser("round-time", help="round time, plain vs secure aggregation")
    t.add_argument("--clients", type=int, default=100)
    t.add_argument("--rounds", type=int, default=4)
    t.add_argument("--repeats", type=int, default=2)
    t.add_argument("--preset", default=None, help="a preset's federation (default digits)")
    a = sub.add_parser("accuracy", help="a client-level preset, central vs distributed")
    a.add_argument("--preset", default="fmnist-client-eps3")
    a.add_argument("--min-contributors", type=float, default=0.95)
    d = sub.add_parser("dropout", help="a deployment that loses a SuperNode mid-run")
    d.add_argument("--nodes", type=int, default=5)
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument(
        "--stage",
        choices=STAGE_ORDER,
        default="masked_update",
        help="the stage of round 2 during which a SuperNode is killed",
    )
    args = p.parse_args(argv)
    if args.what == "epsilon":
        epsilon_table(args.rounds, args.rate, args.target, args.cohort, args.minimum)
    elif args.what == "bytes":
        bytes_table(args.clients, args.models)
    elif args.what == "round-time":
        round_time(args.clients, args.rounds, args.repeats, args.preset)
    elif args.what == "accuracy":
        accuracy(args.preset, args.min_contributors)
    else:
        return dropout(args.nodes, args.rounds, args.stage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
