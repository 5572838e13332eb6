"""Run one private federation on Flower's simulation engine, on this machine.

Starts a simulation SuperLink on 127.0.0.1 (isolated FLWR_HOME, Ray on
loopback), submits this app with ``flwr run``, streams progress, and stops every
process it started, also on Ctrl-C and on failure. Prints the results folder.

    python -m simulations.run --clients 10 --rounds 5 --target-epsilon 8
    python -m simulations.run --resume results/RUN [--rounds 8]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

from common.config import ConfigError, RunConfig
from server.run_outcome import Outcome
from simulations.flower_env import (
    CONNECTION_NAME,
    flower_environment,
    simulation_superlink,
    stage_app,
    write_connection,
)
from simulations.processes import become_subreaper, descendants, stop_processes
from simulations.run_options import (
    APP_DIR,
    add_run_options,
    build_overrides,
    positive_int,
    pyproject_defaults,
    resolve_clients,
    resume_overrides,
)
from simulations.run_output import StreamEnd, interrupted, report_results, stream_process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; each maps to a run-config key (see README)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(p, "simulated SuperNodes")
    p.add_argument(
        "--client-cpus",
        type=positive_int,
        default=1,
        help="CPUs Ray reserves per ClientApp",
    )
    return resolve_clients(p.parse_args(argv))


def install_sigterm_handler() -> None:
    def _raise(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, _raise)


def run_federation(args: argparse.Namespace) -> int:
    """Start the SuperLink, run the app, stream output; return an exit code."""
    overrides = resume_overrides(args) if args.resume else build_overrides(args)
    results_dir = Path(overrides["results-dir"])
    rounds = RunConfig.from_run_config({**pyproject_defaults(), **overrides}).num_rounds
    become_subreaper()
    install_sigterm_handler()
    work = Path(tempfile.mkdtemp(prefix="privfed-sim-"))
    flwr_home = work / "flwr-home"
    flwr_home.mkdir()
    env = flower_environment(flwr_home)
    overrides_file = work / "run-config.toml"
    overrides_file.write_text(tomli_w.dumps(overrides))
    print(f"[privfed] Flower home and logs: {work}", flush=True)
    launched_at = time.time()
    started = time.monotonic()
    flwr_run: subprocess.Popen[str] | None = None
    end: StreamEnd  # set on every path that reaches the report
    try:
        with simulation_superlink(env, work) as link:
            print(f"[privfed] SuperLink serving on {link.address}", flush=True)
            write_connection(flwr_home, link.address)
            argv = [
                str(Path(sys.executable).parent / "flwr"),
                "run",
                str(stage_app(APP_DIR, work)),
                CONNECTION_NAME,
                "--stream",
                "--run-config",
                str(overrides_file),
                "--federation-config",
                f"num-supernodes={args.clients} "
                f"client-resources-num-cpus={args.client_cpus}",
            ]
            flwr_run = subprocess.Popen(
                argv,
                env=env,
                cwd=work,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            end = stream_process(flwr_run, started + args.timeout)
    except KeyboardInterrupt as exc:
        end = interrupted(exc)
    except (RuntimeError, TimeoutError) as exc:  # e.g. the SuperLink did not start
        print(f"[privfed] simulation failed to start: {exc}", file=sys.stderr, flush=True)
        end = StreamEnd(Outcome.FAILED, f"the simulation failed to start: {exc}")
    finally:
        if flwr_run is not None and flwr_run.poll() is None:
            flwr_run.terminate()
            try:
                flwr_run.wait(timeout=10)
            except subprocess.TimeoutExpired:
                flwr_run.kill()
        # Anything left (e.g. daemons Ray re-parented to us) is stopped by PID.
        stop_processes(descendants())
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
