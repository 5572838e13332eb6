"""Run the app on a real local deployment: one SuperLink, N SuperNodes, TLS and auth.

Each SuperNode is its own OS process with its own data shard (``partition-id``)
and state folder (its privacy ledger and its ``privacy-policy.toml``, written from
the run's privacy settings unless the node already has one). Certificates and node
keys are generated into ``--certs-dir`` (reused if present; put your own there),
signed by a CA whose key stays in ``--ca-dir`` (a per-user folder by default, never
the results folder). nginx fronts the SuperLink: nodes reach only its Fleet API.
Streams progress, writes the same results folder as a simulated run, and stops
every process by PID, also on Ctrl-C and on failure.

    python -m simulations.deploy --clients 3 --rounds 2
    python -m simulations.deploy --insecure ...   # plaintext, debugging only
    python -m simulations.deploy --resume results/RUN   # continue from its checkpoint
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tomli_w

from client.privacy.policy import POLICY_FILE, PolicyError, PrivacyPolicy
from common.atomic_files import atomic_write_bytes
from common.config import ConfigError, RunConfig
from server.results.outcome import Outcome, serverapp_settled
from simulations.deployment.certificates import (
    CertificateError,
    add_certificate_options,
    default_ca_dir,
    ensure_tls_files,
    server_sans,
)
from simulations.deployment.deployment_spec import DeploymentSpec
from simulations.deployment.front_proxy import ProxyError, nginx_binary
from simulations.deployment.local import LocalDeployment
from simulations.deployment.node_identity import ensure_node_identity
from simulations.deployment.supernode_heartbeat import patience as task_patience
from simulations.launch.flwr_run import follow_run
from simulations.launch.options import (
    APP_DIR,
    add_run_options,
    build_overrides,
    pyproject_defaults,
    resolve_clients,
    resume_overrides,
)
from simulations.launch.output import StreamEnd, interrupted, report_results
from simulations.launch.preflight import partition_sizes
from simulations.launch.processes import (
    LEFTOVER_GRACE_S,
    become_subreaper,
    descendants,
    install_signal_handlers,
    stop_processes,
)

# How long a deployed ServerApp may take, once its run is stopped, to notice it and
# write its own summary (a few seconds here) before its process is stopped.
SERVERAPP_STOP_GRACE_S = 30.0

INSECURE_WARNING = """
!!! WARNING: --insecure: the SuperLink and SuperNodes talk in PLAINTEXT and any
!!! process can join as a SuperNode (no authentication). Use it only to debug.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options: the simulation's run options plus deployment ones."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(p, "SuperNodes to start", ("--nodes",))
    p.add_argument("--certs-dir", type=Path, help="default: <results-dir>/certs")
    add_certificate_options(p)
    p.add_argument("--state-root", type=Path, help="default: <results-dir>/nodes")
    p.add_argument("--insecure", action="store_true", help="plaintext, no auth (debug)")
    p.add_argument(
        "--cold-clientapp",
        action="store_true",
        help="start every ClientApp process from scratch, as Flower's SuperNode does "
        "(default: forked from a template that has imported Flower and torch: "
        "docs/deployment.md)",
    )
    p.add_argument(
        "--polling-superexecs",
        action="store_true",
        help="let every SuperExec ask for a task to start every 0.1 s, as Flower's "
        "do (default: woken when its SuperLink or SuperNode stores one: "
        "docs/deployment.md)",
    )
    p.add_argument(
        "--task-patience",
        type=task_patience,
        metavar="S",
        help="how long each node's ClientApp process may take to start before the "
        "node gives up its message (default: Flower's fixed 30 s, which many nodes' "
        "ClientApps starting at once on a few cores exceed: docs/faults.md)",
    )
    return resolve_clients(p.parse_args(argv))


def _watchdog(dep: LocalDeployment, nodes: int) -> Callable[[], str | None]:
    """Stop the run if the SuperLink dies; report each SuperNode that exits."""
    reported: set[int] = set()

    def check() -> str | None:
        for handle in dep.exited_supernodes():
            if handle.index not in reported:
                reported.add(handle.index)
                print(
                    f"[privfed] WARNING: SuperNode {handle.index} exited with code "
                    f"{handle.process.popen.returncode}; its log "
                    f"({handle.process.log_path}) ends with:\n"
                    f"{handle.process.log_tail(15)}",
                    file=sys.stderr,
                    flush=True,
                )
        if len(reported) == nodes:
            return "every SuperNode has exited"
        return dep.problem()

    return check


def write_node_policy(
    state_dir: Path, cfg: RunConfig, planning_records: int | None = None
) -> str:
    """Give a new node the run's privacy settings as its device policy.

    This local deployment's owner holds every node's data, so each node releases
    its ledger and timing like a simulated client, and plans from its partition's
    size (``planning_records``, public to that owner). A node that already has a
    policy keeps it: the file is the device owner's, never the server's; a kept
    policy that a record-level run would refuse for lack of ``planning-records``
    stops the launch instead.
    """
    path = state_dir / POLICY_FILE
    if path.exists():
        kept = PrivacyPolicy.from_file(path)  # a bad policy fails before anything starts
        if cfg.is_private and kept.planning_records is None:
            raise PolicyError(
                f"privacy policy ({path}) lacks the key 'planning-records', the public "
                "record count a privacy-mode = 'sample' node plans from (see "
                "docs/edge-clients.md, 'Planning records')"
            )
        return "kept"
    policy = dataclasses.replace(
        PrivacyPolicy.for_simulation(cfg),
        allow_reproducible_noise=cfg.reproducible_noise,
        planning_records=planning_records,
        exact_records=False,
        source=str(path),
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, tomli_w.dumps(policy.to_mapping()).encode(), mode=0o600)
    return "written"


def run_deployment(args: argparse.Namespace) -> int:
    """Start everything, run the app, stream it, tear down; return an exit code."""
    if args.insecure and args.server_san:
        raise ConfigError("--server-san names the TLS certificate; drop --insecure")
    server_sans(args.server_san)  # a bad name fails before anything is written
    overrides = resume_overrides(args) if args.resume else build_overrides(args)
    results_dir = Path(overrides["results-dir"])
    certs = (args.certs_dir or results_dir / "certs").expanduser().resolve()
    state_root = (args.state_root or results_dir / "nodes").expanduser().resolve()
    ca_dir = (args.ca_dir or default_ca_dir()).expanduser().resolve()
    cfg = RunConfig.from_run_config({**pyproject_defaults(), **overrides})
    sizes = partition_sizes(cfg, args.clients)  # each node's public planning count
    policies = [
        write_node_policy(state_root / f"node-{i}", cfg, sizes[i])
        for i in range(args.clients)
    ]
    print(
        f"[privfed] node privacy policies in {state_root}/node-*/{POLICY_FILE}: "
        f"{policies.count('written')} written from the run's privacy settings, "
        f"{policies.count('kept')} kept as they were",
        flush=True,
    )
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    else:
        nginx_binary()  # so do a missing nginx, a partial folder, a loose CA key
        ensure_tls_files(certs, ca_dir, args.server_san)
        print(f"[privfed] certificates in {certs}; CA key in {ca_dir}", flush=True)
    if cfg.secure_aggregation:  # each node's identity, certified by the CA
        for i in range(args.clients):
            ensure_node_identity(state_root / f"node-{i}", ca_dir, f"node-{i}")
        print(
            f"[privfed] node identities in {state_root}/node-*/identity/, certified by "
            f"the CA in {ca_dir} (the server must not hold that CA's key for the "
            "guarantee against an active server: docs/secure-aggregation.md)",
            flush=True,
        )
    become_subreaper()
    install_signal_handlers()
    # Flower homes and logs live outside the app folder, which `flwr run` packages.
    work = Path(tempfile.mkdtemp(prefix="privfed-deploy-"))
    launched_at, started = time.time(), time.monotonic()
    end: StreamEnd  # set on every path that reaches the report
    try:
        spec = DeploymentSpec(
            work,
            certs,
            secure=not args.insecure,
            ca_dir=ca_dir,
            server_sans=tuple(args.server_san),
            warm_clientapp=not args.cold_clientapp,
            wake_superexecs=not args.polling_superexecs,
        )
        with LocalDeployment(spec) as dep:
            dep.start_superlink()
            mode = (
                f"TLS + SuperNode authentication; nodes' address: nginx, Fleet API "
                f"only; operator gateway {dep.control_address}; SuperLink's own port "
                f"{dep.port}"
                if not args.insecure
                else "INSECURE"
            )
            print(
                f"[privfed] SuperLink on {dep.address} ({mode}); logs in {work}", flush=True
            )
            for i in range(args.clients):  # each starts while the next is registered
                key = None if args.insecure else dep.node_key(i)
                node_config = {
                    "partition-id": i,
                    "num-partitions": args.clients,
                    "state-dir": str(state_root / f"node-{i}"),
                }
                dep.start_supernode(
                    i, node_config, key, wait=False, task_patience=args.task_patience
                )
            for i in range(args.clients):
                dep.wait_ready(i)
            print(f"[privfed] {args.clients} SuperNodes serving and admitted", flush=True)
            run_config = work / "run-config.toml"
            run_config.write_text(tomli_w.dumps(overrides))
            end = follow_run(
                dep.submit(run_config, APP_DIR),
                started + args.timeout,
                _watchdog(dep, args.clients),
                serverapp_grace=SERVERAPP_STOP_GRACE_S,
                serverapp_done=lambda: serverapp_settled(results_dir, launched_at),
            )
    except KeyboardInterrupt as exc:  # before the run was submitted, or while stopping
        end = interrupted(exc)
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
        print(f"[privfed] deployment failed to start: {exc}", file=sys.stderr, flush=True)
        end = StreamEnd(Outcome.FAILED, f"the deployment failed to start: {exc}")
    finally:
        stop_processes(descendants(), grace=LEFTOVER_GRACE_S)
    print(f"[privfed] node ledgers: {state_root} (python -m client.show_ledger DIR)")
    seconds = time.monotonic() - started
    return report_results(end, results_dir, cfg.num_rounds, seconds, work, launched_at)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    try:
        return run_deployment(args)
    except (ConfigError, CertificateError, PolicyError, ProxyError) as exc:
        print(f"[privfed] configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
