"""Soak a secure deployment on separate hosts under faults, and print its verdict.

The SuperLink (behind nginx) and every SuperNode get their own Linux network
namespace on one bridge (``simulations/deployment/netns.py``); faults come from
``--faults`` and/or ``--random-faults`` drawn with ``--fault-seed``. The verdict
(rounds completed, updates accepted / refused / lost, every node's ledger
against ``rounds.jsonl``, secure aggregation's unmasked and abandoned rounds,
accuracy against ``--baseline``) is printed and written to
``<results-dir>/soak-verdict.json``. Needs root and iproute2; see docs/faults.md.

    python -m simulations.soak --nodes 5 --rounds 3 \
        --faults "kill@2:node=1,down=3 partition@2:node=3,for=20"
    python -m simulations.soak --nodes 20 --rounds 10 --fault-seed 7 \
        --random-faults kills=3,freezes=2,freeze-s=30,partitions=1,partition-s=60
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from client.privacy.policy import PolicyError
from common.config import ConfigError
from simulations.deployment.certificates import CertificateError, add_certificate_options
from simulations.deployment.faults import (
    FaultSchedule,
    FaultSpecError,
    parse_random,
    random_schedule,
)
from simulations.deployment.front_proxy import ProxyError
from simulations.deployment.netns import LabView, NetLab, capability_problem, leftovers
from simulations.deployment.supernode_heartbeat import interval as heartbeat_interval
from simulations.deployment.supernode_heartbeat import patience as task_patience
from simulations.launch.options import add_run_options, resolve_clients
from simulations.launch.processes import (
    become_subreaper,
    descendants,
    install_signal_handlers,
    process_tree,
    stop_processes,
)

EXIT_CANNOT_RUN = 3  # the machine lacks a capability (printed); nothing started
VERDICT_FILE = "soak-verdict.json"
INNER_STOP_GRACE_S = 90.0  # for the inner run to stop its run and write its summary
TEARDOWN_MARGIN_S = 300.0  # beyond --timeout: start-up, a resume, teardown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The deployment's run options plus the fault options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(p, "SuperNodes to start, each on its own host", ("--nodes",))
    add_certificate_options(p)
    p.add_argument(
        "--faults",
        default="",
        help="schedule, e.g. 'kill@2+task:node=1,down=5' (docs/faults.md)",
    )
    p.add_argument(
        "--random-faults",
        default="",
        help="drawn faults: kills=N,freezes=N,freeze-s=S,partitions=N,partition-s=S,"
        "partition-fraction=F",
    )
    p.add_argument("--fault-seed", type=int, help="default: --seed (else 42)")
    p.add_argument("--baseline", type=Path, help="a fault-free run's results folder")
    p.add_argument(
        "--kill-heartbeat",
        type=heartbeat_interval,
        metavar="S",
        help="the heartbeat interval (10 s or more) that nodes only ever killed declare; "
        "the SuperLink gives up a killed node's message and re-admits it after 2 x S "
        "(default: Flower's 30 s). Nodes that must ride out a freeze, partition or "
        "proxy fault keep 30 s",
    )
    p.add_argument(
        "--task-patience",
        type=task_patience,
        metavar="S",
        help="how long every node's ClientApp processes may take to start before "
        "the node gives up their message (default: Flower's fixed 30 s, which 20 "
        "nodes' ClientApps at once on 2 cores exceed: docs/faults.md)",
    )
    p.add_argument("--inner-lab", type=Path, help=argparse.SUPPRESS)
    return _resumed_shape(resolve_clients(p.parse_args(argv)))


def _resumed_shape(args: argparse.Namespace) -> argparse.Namespace:
    """A resumed soak starts as many hosts as the run has nodes, and plans its faults
    over the run's rounds, unless ``--nodes`` / ``--rounds`` say otherwise."""
    if not args.resume:
        return args
    config_file = Path(args.resume).expanduser() / "config.json"
    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))["run_config"]
        nodes, rounds = int(saved["min-available-nodes"]), int(saved["num-rounds"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"--resume {args.resume}: {config_file} is missing or unreadable ({exc})"
        ) from None
    if args.clients is None:
        args.clients = nodes
    if args.rounds is None:
        args.rounds = rounds
    return args


def schedule_of(args: argparse.Namespace) -> FaultSchedule:
    """``--faults`` plus the drawn ``--random-faults``, checked against the run."""
    rounds = args.rounds or 5
    given = FaultSchedule.parse(args.faults, args.clients, rounds)
    if not args.random_faults:
        return given
    seed = args.fault_seed if args.fault_seed is not None else (args.seed or 42)
    drawn = random_schedule(parse_random(args.random_faults), args.clients, rounds, seed)
    return FaultSchedule(given.faults + drawn.faults, args.clients, rounds)


def inner(args: argparse.Namespace) -> int:
    """Inside the server's namespace: run, then judge."""
    from simulations.deployment.fault_run import FaultRun
    from simulations.deployment.verdict import soak_verdict, verdict_text

    lab = LabView.from_json(args.inner_lab.read_text())
    schedule = schedule_of(args)
    run = FaultRun(args, lab, schedule)
    code, seconds = run.run()
    verdict = soak_verdict(
        run.results_dir, args.clients, schedule.text(), seconds, args.baseline
    )
    (run.results_dir / VERDICT_FILE).write_text(json.dumps(verdict, indent=2))
    print(verdict_text(verdict), flush=True)
    print(f"[soak] verdict: {run.results_dir / VERDICT_FILE}", flush=True)
    if code == 0 and verdict["verdict"] != "PASS":
        return 1
    return code


def outer(args: argparse.Namespace, argv: list[str]) -> int:
    """Make the lab, run :func:`inner` on the server host, remove the lab."""
    problem = capability_problem()
    if problem is not None:
        print(f"[soak] cannot run here: {problem}", file=sys.stderr, flush=True)
        return EXIT_CANNOT_RUN
    become_subreaper()
    install_signal_handlers()
    lab = NetLab(args.clients)
    code = 1
    proc: subprocess.Popen[bytes] | None = None
    try:
        view = lab.open()
        print(
            f"[soak] lab {lab.prefix}: server {view.server.address}, "
            f"{len(view.hosts)} node hosts on bridge {lab.bridge}",
            flush=True,
        )
        lab_file = Path(tempfile.mkdtemp(prefix=f"privfed-{lab.prefix}-")) / "lab.json"
        lab_file.write_text(view.to_json())
        cmd = [*view.server.prefix, sys.executable, "-m", "simulations.soak", *argv,
               "--inner-lab", str(lab_file)]  # fmt: skip
        proc = subprocess.Popen(cmd, process_group=0)
        code = proc.wait(timeout=args.timeout + TEARDOWN_MARGIN_S)
    except KeyboardInterrupt as exc:
        print(f"[soak] interrupted ({exc}); stopping the run", flush=True)
        code = 130
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=INNER_STOP_GRACE_S)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                pass
    except subprocess.TimeoutExpired:
        print("[soak] the run passed its deadline; stopping it", flush=True)
        code = 124
    finally:
        if proc is not None:
            stop_processes(process_tree(proc.pid), grace=10.0)
        stop_processes(descendants(), grace=3.0)
        errors = lab.close()
        left = leftovers(lab.prefix)
        if errors or left:
            print(f"[soak] lab {lab.prefix} NOT fully removed: {errors} {left}", flush=True)
            code = code or 1
        else:
            print(f"[soak] lab {lab.prefix} removed: no namespace or link left", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        schedule_of(args)  # a bad schedule fails before anything starts
        if args.inner_lab is not None:
            return inner(args)
        return outer(args, argv)
    except (ConfigError, FaultSpecError, CertificateError, PolicyError, ProxyError) as exc:
        print(f"[soak] configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    sys.exit(main())
