"""Run one private federation on Flower's simulation engine, on this machine.

Starts a simulation SuperLink on 127.0.0.1 (isolated FLWR_HOME, Ray on
loopback), submits this app with ``flwr run``, streams progress, and stops every
process it started, also on Ctrl-C and on failure. Prints the results folder.

    python -m simulations.run --clients 10 --rounds 5 --target-epsilon 8
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w

from common.config import ConfigError, RunConfig
from common.datasets import DatasetError, resolve_idx_dir
from simulations.flower_env import (
    CONNECTION_NAME,
    flower_environment,
    simulation_superlink,
    write_connection,
)
from simulations.processes import become_subreaper, descendants, stop_processes

APP_DIR = Path(__file__).resolve().parent.parent

# CLI option -> run-config key; None means "leave the pyproject default".
_OPTION_KEYS = {
    "dataset": "dataset",
    "data_dir": "data-dir",
    "rounds": "num-rounds",
    "partitioner": "partitioner",
    "alpha": "dirichlet-alpha",
    "classes_per_client": "classes-per-client",
    "target_epsilon": "target-epsilon",
    "noise_multiplier": "noise-multiplier",
    "epsilon_budget": "epsilon-budget",
    "delta": "delta",
    "accountant": "accountant",
    "privacy_mode": "privacy-mode",
    "local_epochs": "local-epochs",
    "batch_size": "batch-size",
    "learning_rate": "learning-rate",
    "momentum": "momentum",
    "max_grad_norm": "max-grad-norm",
    "fraction_train": "fraction-train",
    "seed": "seed",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; each maps to a run-config key (see README)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10, help="simulated SuperNodes")
    p.add_argument("--rounds", type=int)
    p.add_argument("--dataset", choices=["digits", "fashion-mnist", "mnist"])
    p.add_argument("--data-dir", help="directory with the IDX .gz files")
    p.add_argument("--partitioner", choices=["iid", "dirichlet", "pathological"])
    p.add_argument("--alpha", type=float, help="Dirichlet concentration")
    p.add_argument("--classes-per-client", type=int)
    p.add_argument("--target-epsilon", type=float)
    p.add_argument("--noise-multiplier", type=float)
    p.add_argument("--epsilon-budget", type=float)
    p.add_argument("--delta", type=float)
    p.add_argument("--accountant", choices=["rdp", "prv"])
    p.add_argument("--privacy-mode", choices=["sample", "none"])
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--max-grad-norm", type=float)
    p.add_argument("--fraction-train", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--results-dir", help="default: results/<time>-<dataset>")
    p.add_argument(
        "--client-cpus", type=int, default=1, help="CPUs Ray reserves per ClientApp"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other run-config key (TOML value), repeatable",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for the run")
    args = p.parse_args(argv)
    if args.clients < 1:
        p.error("--clients must be >= 1")
    return args


def build_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Run-config overrides from the options; validated before anything starts."""
    import tomllib

    overrides: dict[str, Any] = {}
    for item in args.set:
        try:
            overrides.update(tomllib.loads(item))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                f"--set {item!r}: not KEY=VALUE in TOML syntax ({exc})"
            ) from None
    for option, key in _OPTION_KEYS.items():
        value = getattr(args, option)
        if value is not None:
            overrides[key] = value
    overrides["min-available-nodes"] = args.clients
    overrides.setdefault("min-train-nodes", min(2, args.clients))
    if args.privacy_mode == "none":
        overrides.setdefault("target-epsilon", 0.0)
    if args.noise_multiplier is not None and args.target_epsilon is None:
        overrides["target-epsilon"] = 0.0  # the σ option replaces the default ε target
    dataset = overrides.get("dataset", RunConfig().dataset)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    results = Path(args.results_dir or Path("results", f"{stamp}-{dataset}"))
    results = results.expanduser().resolve()
    if (results / "rounds.jsonl").exists() or (results / "summary.json").exists():
        raise ConfigError(
            f"--results-dir {results} already holds a run; choose a new directory"
        )
    overrides["results-dir"] = str(results)
    defaults = _pyproject_defaults()
    cfg = RunConfig.from_run_config({**defaults, **overrides})  # fail before starting
    if cfg.dataset != "digits":
        try:
            resolve_idx_dir(cfg.dataset, cfg.data_dir)
        except DatasetError as exc:
            raise ConfigError(str(exc)) from None
    return overrides


def _pyproject_defaults() -> dict[str, Any]:
    import tomllib

    with open(APP_DIR / "pyproject.toml", "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def _install_sigterm_handler() -> None:
    def _raise(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)


def run_federation(args: argparse.Namespace) -> int:
    """Start the SuperLink, run the app, stream output; return an exit code."""
    overrides = build_overrides(args)
    results_dir = Path(overrides["results-dir"])
    become_subreaper()
    _install_sigterm_handler()
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
    try:
        with simulation_superlink(env, work) as link:
            print(f"[privfed] SuperLink serving on {link.address}", flush=True)
            write_connection(flwr_home, link.address)
            argv = [
                str(Path(sys.executable).parent / "flwr"),
                "run",
                str(APP_DIR),
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
            code = _stream(flwr_run, started + args.timeout)
    except KeyboardInterrupt:
        print("\n[privfed] interrupted; stopping every process started", flush=True)
        code = 130
    finally:
        if flwr_run is not None and flwr_run.poll() is None:
            flwr_run.terminate()
            try:
                flwr_run.wait(timeout=10)
            except subprocess.TimeoutExpired:
                flwr_run.kill()
        # Anything left (e.g. daemons Ray re-parented to us) is stopped by PID.
        stop_processes(descendants())
    return _report(code, results_dir, time.monotonic() - started, work, launched_at)


def _stream(proc: subprocess.Popen[str], deadline: float) -> int:
    """Copy the run's output to stdout until it exits or the deadline passes."""

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    while True:
        try:
            code = proc.wait(timeout=1.0)
            reader.join(timeout=5)
            return code
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                print("[privfed] time limit reached; stopping the run", flush=True)
                return 124


def _report(
    code: int, results_dir: Path, seconds: float, work: Path, launched_at: float
) -> int:
    summary_path = results_dir / "summary.json"
    if not summary_path.exists():
        print(
            f"[privfed] FAILED after {seconds:.0f} s (exit {code}): no summary.json in "
            f"{results_dir}; logs in {work}",
            file=sys.stderr,
        )
        return code or 1
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "completed":
        print(
            f"[privfed] run FAILED: {summary.get('stop_reason')}; see {results_dir}",
            file=sys.stderr,
        )
        return code or 1
    final = summary.get("final_central", {})
    eps = summary.get("max_epsilon")
    if eps is not None:
        eps_text = (
            f"max cumulative ε {eps:.3f} ({summary['accountant']}, δ={summary['delta']:g})"
        )
    elif summary.get("accountant") == "none":
        eps_text = "non-private run (no ε)"
    else:
        eps_text = "no client trained, so no ε was spent"
    print(
        f"[privfed] done in {seconds:.0f} s: {summary['stop_reason']}; "
        f"accuracy {final.get('accuracy', float('nan')):.4f}; {eps_text}",
        flush=True,
    )
    _print_timing(results_dir, summary, launched_at)
    print(f"[privfed] results: {results_dir}", flush=True)
    return code


def _print_timing(results_dir: Path, summary: dict[str, Any], launched_at: float) -> None:
    """Start-up (launch to round 1) and per-round orchestration, from the results."""
    lines = (results_dir / "rounds.jsonl").read_text().splitlines()
    if not lines:
        return
    first = json.loads(lines[0])
    breakdown = summary.get("time_breakdown_seconds", {})
    print(
        f"[privfed] time: launch to round 1 {first['started_at'] - launched_at:.1f} s "
        f"(ServerApp start to round 1 {breakdown.get('startup_to_round_1', 0):.1f} s); "
        f"orchestration {summary.get('orchestration_seconds_per_round_median')} s/round "
        f"(median); client compute {breakdown.get('client_compute_sum', 0):.1f} s in all",
        flush=True,
    )


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
