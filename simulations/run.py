"""Run one private federation on Flower's simulation engine, on this machine.

Starts a simulation SuperLink on 127.0.0.1 (isolated FLWR_HOME) and, beside it, a
private Ray head on loopback (or attaches to the Ray cluster of ``--ray-address``),
submits this app with ``flwr run``, streams progress, and stops every process it
started by PID.
A run that must end early (Ctrl-C, SIGTERM, SIGHUP, ``--timeout``) is stopped with
``flwr stop`` first. Prints the results folder.

    python -m simulations.run --clients 10 --rounds 5 --target-epsilon 8
    python -m simulations.run --resume results/RUN [--rounds 8]
    python -m simulations.run --ray-address 10.0.0.5:6379 --clients 100
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import tomli_w

from common.config import ConfigError, RunConfig
from server.results.outcome import Outcome
from simulations.engine.engines import ENGINES, choose_engine, engine_for_runs
from simulations.launch.dealer import trusted_dealer
from simulations.launch.flower_env import (
    CONNECTION_NAME,
    flower_environment,
    simulation_superlink,
    stage_app,
    write_connection,
)
from simulations.launch.flwr_run import FLWR, Interrupt, SubmittedRun, follow_run
from simulations.launch.options import (
    APP_DIR,
    add_run_options,
    build_overrides,
    positive_int,
    pyproject_defaults,
    ray_address,
    resolve_clients,
    resolve_ray_address,
    resume_overrides,
)
from simulations.launch.output import StreamEnd, interrupted, report_results
from simulations.launch.processes import (
    LEFTOVER_GRACE_S,
    become_subreaper,
    descendants,
    install_signal_handlers,
    stop_processes,
)
from simulations.launch.warm_flwr import WarmFlwr, WarmFlwrPool

# A simulation's ServerApp runs in a thread of flwr-simulation, which Flower ends
# about 15 s after `flwr stop` (its log upload is refused, it waits, then exits)
# while the ServerApp goes on with rounds. It cannot write a summary once stopped,
# so it is stopped at once (its Ray workers with it); the launcher summarises.
SIMULATION_KILL_S = 1.0


def add_simulation_options(p: argparse.ArgumentParser) -> None:
    """Options of the simulation engine (also the sweep's)."""
    p.add_argument(
        "--client-cpus",
        type=positive_int,
        default=1,
        help="CPUs per ClientApp: the process engine forks one worker per "
        "CPUs / client-cpus; Ray reserves them per actor",
    )
    p.add_argument(
        "--simulated-nodes",
        type=positive_int,
        metavar="K",
        help="SuperNodes the simulation engine runs; each hosts every K-th client and "
        "trains its share of a round's cohort in one message (run key "
        "'virtual-clients'; docs/simulation.md, 'Virtual clients'). Default: one per "
        "ClientApp worker, CPUs / --client-cpus (at most one per client); one per "
        "client on a cluster (--ray-address)",
    )
    p.add_argument(
        "--engine",
        choices=sorted(ENGINES),
        help="what runs the ClientApps: "
        + "; ".join(f"{e.name}: {e.summary}" for e in ENGINES.values())
        + " (default: ray with --ray-address, else process; docs/simulation.md, "
        "'Engines')",
    )
    p.add_argument(
        "--ray-address",
        type=ray_address,
        metavar="HOST:PORT",
        help="attach to this running Ray cluster (its head's address, as `ray start "
        "--head` prints it) instead of starting a private Ray head; default: "
        "$RAY_ADDRESS if set",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; each maps to a run-config key (docs/run-keys.md)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(p, "simulated SuperNodes")
    add_simulation_options(p)
    return resolve_clients(p.parse_args(argv))


def client_workers(args: argparse.Namespace) -> int:
    """ClientApps a run trains at once on this machine: one per ``--client-cpus``."""
    return max(1, (os.cpu_count() or 1) // max(1, args.client_cpus))


def simulated_nodes(args: argparse.Namespace) -> int:
    """How many SuperNodes the simulation engine runs for ``--clients`` clients.

    Flower's simulation engine costs tens of milliseconds per message whatever it
    carries, so by default a run on this machine has one SuperNode per ClientApp
    worker (:func:`client_workers`), each hosting a share of the clients
    (client/virtual_clients.py);
    on a cluster, where the launcher cannot see the CPUs, one per client unless
    ``--simulated-nodes`` says otherwise.
    """
    asked = getattr(args, "simulated_nodes", None)
    if asked is None and resolve_ray_address(getattr(args, "ray_address", None)):
        asked = args.clients
    if asked is None:
        asked = client_workers(args)
    return min(asked, args.clients)


def submit_simulation(
    app: Path,
    work: Path,
    env: dict[str, str],
    overrides: dict[str, Any],
    clients: int,
    client_cpus: int,
    out: TextIO | None = None,
    supernodes: int | None = None,
    warm: WarmFlwr | None = None,
) -> SubmittedRun:
    """``flwr run`` the staged app on the SuperLink of ``env``'s Flower home, on
    ``supernodes`` simulated SuperNodes (default one per client) that host the
    ``clients`` clients between them."""
    nodes = min(supernodes or clients, clients)
    overrides = {**overrides, "virtual-clients": clients if nodes < clients else 0}
    run_config = Path(tempfile.mkstemp(prefix="run-config-", suffix=".toml", dir=work)[1])
    run_config.write_text(tomli_w.dumps(overrides))
    argv = [
        str(FLWR), "run", str(app), CONNECTION_NAME, "--stream",
        "--run-config", str(run_config),
        "--federation-config",
        f"num-supernodes={nodes} client-resources-num-cpus={client_cpus}",
    ]  # fmt: skip
    return SubmittedRun(argv, env, work, CONNECTION_NAME, out, warm)


@dataclass(frozen=True)
class RunReport:
    """How one run on a SuperLink went: its exit code, and when it was launched."""

    exit_code: int
    launched_at: float  # Unix time of the submission


def run_on_superlink(
    app: Path,
    work: Path,
    env: dict[str, str],
    overrides: dict[str, Any],
    args: argparse.Namespace,
    out: TextIO | None = None,
    interrupt: Interrupt | None = None,
    launched: tuple[float, float] | None = None,
    pool: WarmFlwrPool | None = None,
) -> RunReport:
    """One run on a running simulation SuperLink: submit, follow, stop it if it
    must end early (``flwr stop``, then its process), and report its results.

    ``launched`` is when the launch began (Unix and monotonic time; default: now),
    from which ``--timeout`` and the launch-to-round-1 time count. ``pool`` gives
    the submission a ``flwr`` started ahead (:mod:`simulations.launch.warm_flwr`).
    """
    results_dir = Path(overrides["results-dir"])
    cfg = RunConfig.from_run_config({**pyproject_defaults(), **overrides})
    rounds = cfg.num_rounds
    launched_at, started = launched or (time.time(), time.monotonic())
    run = submit_simulation(
        app, work, env, overrides, args.clients, args.client_cpus, out,
        simulated_nodes(args), pool.take() if pool is not None else None,
    )  # fmt: skip
    end = follow_run(
        run, started + args.timeout, interrupt=interrupt, kill_grace=SIMULATION_KILL_S
    )
    seconds = time.monotonic() - started
    code = report_results(end, results_dir, rounds, seconds, work, launched_at, out)
    return RunReport(code, launched_at)


def run_federation(args: argparse.Namespace) -> int:
    """Start the SuperLink, run the app, stream output; return an exit code."""
    overrides = resume_overrides(args) if args.resume else build_overrides(args)
    results_dir = Path(overrides["results-dir"])
    cfg = RunConfig.from_run_config({**pyproject_defaults(), **overrides})
    rounds = cfg.num_rounds
    ray = resolve_ray_address(args.ray_address)
    engine = choose_engine(args.engine, ray)
    become_subreaper()
    install_signal_handlers()
    work = Path(tempfile.mkdtemp(prefix="privfed-sim-"))
    flwr_home = work / "flwr-home"
    flwr_home.mkdir()
    env = flower_environment(flwr_home, ray)
    if cfg.secure_aggregation:  # its node identities, dealt by this launcher
        trusted_dealer(env, work, args.clients)
    print(f"[privfed] Flower home and logs: {work}", flush=True)
    launched_at = time.time()
    started = time.monotonic()
    end: StreamEnd | None = None  # set where the run did not get to report itself
    try:
        # The Ray engine's private head starts beside the SuperLink: round 1 waits
        # for the simulated nodes, whose Ray workers would otherwise wait for
        # Flower's own ray.init() to start Ray (BENCHMARKS.md, "Launch to round 1").
        # `flwr run` imports its CLI while the SuperLink starts (warm_flwr.py).
        cpus = os.cpu_count() or 1
        with (
            engine_for_runs(engine, env, work, ray, cpus, client_workers(args)) as running,
            closing(WarmFlwrPool(env, work, submissions=1)) as pool,
            simulation_superlink(env, work, warm=not engine.uses_ray) as link,
        ):
            head = running.head
            print(f"[privfed] Engine: {running.describe()}", flush=True)
            print(f"[privfed] SuperLink serving on {link.address}", flush=True)
            write_connection(flwr_home, link.address)
            app = stage_app(APP_DIR, work)
            if head is not None:
                head.wait_serving()  # the rest of its start overlaps the run's
            launched = (launched_at, started)  # the SuperLink's start counts
            return run_on_superlink(
                app, work, env, overrides, args, launched=launched, pool=pool
            ).exit_code
    except KeyboardInterrupt as exc:  # before the run was submitted, or while stopping
        end = interrupted(exc)
    except (RuntimeError, TimeoutError) as exc:  # e.g. the SuperLink did not start
        print(f"[privfed] simulation failed to start: {exc}", file=sys.stderr, flush=True)
        end = StreamEnd(Outcome.FAILED, f"the simulation failed to start: {exc}")
    finally:
        # Anything left (e.g. daemons Ray re-parented to us) is stopped by PID.
        stop_processes(descendants(), grace=LEFTOVER_GRACE_S)
    seconds = time.monotonic() - started
    return report_results(end, results_dir, rounds, seconds, work, launched_at)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    try:
        return run_federation(args)
    except ConfigError as exc:
        print(f"[privfed] configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
