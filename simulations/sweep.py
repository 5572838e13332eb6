"""Run a grid of federations (target ε × partitioner × seed) and tabulate them.

Every grid point is checked first, then all run on one simulation SuperLink that
the sweep starts once (on 127.0.0.1, with its own FLWR_HOME) and stops by PID at
the end, also on Ctrl-C, SIGTERM or a failure: each point is one ``flwr run``
with its own results folder and ``summary.json`` (written by the launcher's code
if the ServerApp could not), and its log in ``<point>.log``. A non-private run per
partitioner and seed gives the reference line. Writes ``sweep.csv``, ``sweep.md``
and ``accuracy_vs_epsilon.png`` into the sweep folder.

    python -m simulations.sweep --epsilons 1 3 8 --partitioners iid dirichlet \\
        --seeds 0 1 --clients 10 --rounds 5 --jobs 1
    python -m simulations.sweep --preset fmnist-eps3 --epsilons 1 2 3 \\
        --partitioners iid dirichlet
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
import tomllib
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.config import ConfigError, RunConfig
from common.run_keys import PARTITIONERS, PRIVACY_MODES
from common.tasks.registry import task_names
from server.results.outcome import Outcome
from simulations.engine.engines import choose_engine, engine_for_runs
from simulations.launch.dealer import trusted_dealer
from simulations.launch.flower_env import (
    flower_environment,
    install_app,
    simulation_superlink,
    stage_app,
    write_connection,
)
from simulations.launch.flwr_run import Interrupt
from simulations.launch.options import (
    APP_DIR,
    build_overrides,
    positive_seconds,
    pyproject_defaults,
    resolve_ray_address,
)
from simulations.launch.output import launch_to_round_1
from simulations.launch.processes import (
    LEFTOVER_GRACE_S,
    become_subreaper,
    descendants,
    install_signal_handlers,
    stop_processes,
)
from simulations.launch.sweep_report import (
    plot,
    print_amortised,
    write_table,
)
from simulations.launch.warm_flwr import WarmFlwrPool
from simulations.presets import PRESETS
from simulations.run import add_simulation_options, client_workers, run_on_superlink
from simulations.run import parse_args as run_options

NOT_STARTED = "not started (the sweep was interrupted)"


@dataclass(frozen=True)
class GridPoint:
    """One federation of the sweep; ``target_epsilon`` None means non-private."""

    target_epsilon: float | None
    partitioner: str
    seed: int

    @property
    def name(self) -> str:
        """Folder name of this point."""
        eps = "nonprivate" if self.target_epsilon is None else f"eps{self.target_epsilon:g}"
        return f"{eps}-{self.partitioner}-seed{self.seed}"


@dataclass(frozen=True)
class PointResult:
    """What one grid point produced (a row of the table)."""

    name: str
    target_epsilon: float | None
    partitioner: str
    seed: int
    status: str
    accuracy: float | None
    max_epsilon: float | None
    accountant: str | None
    delta: float | None
    wall_seconds: float | None
    privacy_unit: str | None = None  # record, client, or None (non-private)
    launch_to_round_1_seconds: float | None = None  # submission to round 1


def grid(args: argparse.Namespace) -> list[GridPoint]:
    """Every private point, plus a non-private reference per partitioner and seed."""
    points = [
        GridPoint(eps, part, seed)
        for eps, part, seed in itertools.product(
            args.epsilons, args.partitioners, args.seeds
        )
    ]
    if not args.no_reference:
        points += [
            GridPoint(None, p, s)
            for p, s in itertools.product(args.partitioners, args.seeds)
        ]
    return points


def point_options(point: GridPoint, args: argparse.Namespace, out_dir: Path) -> list[str]:
    """``simulations.run``'s options for one grid point."""
    argv = [
        "--partitioner", point.partitioner,
        "--seed", str(point.seed), "--results-dir", str(out_dir / point.name),
        "--client-cpus", str(args.client_cpus), "--timeout", str(args.timeout),
    ]  # fmt: skip
    for option in ("clients", "preset", "rounds", "task"):  # unset: preset's/default
        if getattr(args, option) is not None:
            argv += [f"--{option}", str(getattr(args, option))]
    if point.target_epsilon is None:
        argv += ["--privacy-mode", "none"]
        if args.privacy_mode == "client":  # the same cohorts, without clipping or noise
            argv += ["--set", f"fraction-train={client_sampling_rate(args)}"]
    else:
        argv += ["--privacy-mode", args.privacy_mode]
        argv += ["--target-epsilon", str(point.target_epsilon)]
    for item in args.set:
        argv += ["--set", item]
    return argv


def client_sampling_rate(args: argparse.Namespace) -> float:
    """q of the sweep's client-level points: ``--set``, else the preset's, else default."""
    rate = RunConfig().client_sampling_rate
    if args.preset:
        rate = PRESETS[args.preset].run_config.get("client-sampling-rate", rate)
    for item in args.set:
        rate = tomllib.loads(item).get("client-sampling-rate", rate)
    return float(rate)


def check_points(
    points: list[GridPoint], args: argparse.Namespace, out_dir: Path
) -> list[tuple[argparse.Namespace, dict[str, Any]]]:
    """Validate every point's options and run keys before any federation starts;
    return each point's options and run-config overrides."""
    checked = []
    for point in points:
        try:
            options = run_options(point_options(point, args, out_dir))
            checked.append((options, build_overrides(options)))
        except ConfigError as exc:
            raise ConfigError(f"grid point {point.name}: {exc}") from None
    return checked


@dataclass(frozen=True)
class SweepLink:
    """The sweep's SuperLink: its environment, working folder and staged app."""

    env: dict[str, str]
    work: Path
    app: Path
    pool: WarmFlwrPool | None = None  # `flwr` started ahead of each point's submission


def run_point(
    point: GridPoint,
    options: argparse.Namespace,
    overrides: dict[str, Any],
    link: SweepLink,
    out_dir: Path,
    interrupt: Interrupt,
) -> PointResult:
    """Run one federation on the sweep's SuperLink and read its summary."""
    results = Path(overrides["results-dir"])
    print(f"[sweep] start {point.name}", flush=True)
    with open(out_dir / f"{point.name}.log", "w", encoding="utf-8") as log:
        report = run_on_superlink(
            link.app, link.work, link.env, overrides, options, log, interrupt,
            pool=link.pool,
        )  # fmt: skip
    summary_path = results / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    status = summary.get("status", Outcome.FAILED.value)
    if report.exit_code != 0:
        status = f"{status} (exit {report.exit_code})"
    result = _result(point, status, summary, launch_to_round_1(results, report.launched_at))
    print(f"[sweep] done  {point.name}: {status}, accuracy {result.accuracy}", flush=True)
    return result


def _result(
    point: GridPoint, status: str, summary: dict[str, Any], launch: float | None = None
) -> PointResult:
    return PointResult(
        name=point.name,
        target_epsilon=point.target_epsilon,
        partitioner=point.partitioner,
        seed=point.seed,
        status=status,
        accuracy=(summary.get("final_central") or {}).get("accuracy"),
        max_epsilon=summary.get("max_epsilon"),
        accountant=summary.get("accountant"),
        delta=summary.get("delta"),
        wall_seconds=summary.get("wall_seconds"),
        privacy_unit=summary.get("privacy_unit"),
        launch_to_round_1_seconds=None if launch is None else round(launch, 3),
    )


def run_grid(
    points: list[GridPoint],
    checked: list[tuple[argparse.Namespace, dict[str, Any]]],
    args: argparse.Namespace,
    out_dir: Path,
) -> tuple[list[PointResult], str | None]:
    """Start the sweep's SuperLink, run every point on it (``--jobs`` at a time),
    stop it by PID; return the rows and the interrupt that stopped it, if any."""
    ray = resolve_ray_address(args.ray_address)
    engine = choose_engine(args.engine, ray)
    become_subreaper()
    install_signal_handlers()
    work = Path(tempfile.mkdtemp(prefix="privfed-sweep-"))
    flwr_home = work / "flwr-home"
    flwr_home.mkdir()
    env = flower_environment(flwr_home, ray)
    secure = [
        opts.clients
        for opts, keys in checked
        if RunConfig.from_run_config({**pyproject_defaults(), **keys}).secure_aggregation
    ]
    if secure:  # secure aggregation's node identities, dealt by this launcher
        trusted_dealer(env, work, max(secure))
    print(f"[sweep] Flower home and logs: {work}", flush=True)
    interrupt = Interrupt()
    futures: list[Future[PointResult]] = []
    finished: dict[str, PointResult] = {}  # by point name, as each point returns

    def run_and_keep(point: GridPoint, *rest: Any) -> PointResult:
        """Run a point unless interrupted; its row is kept before it counts as done."""
        with interrupt.unless_set() as go:
            try:
                result = run_point(point, *rest) if go else _result(point, NOT_STARTED, {})
            except Exception as exc:  # a bug: keep the row, then end the sweep
                finished[point.name] = _result(point, f"failed ({exc!r})", {})
                raise
            finished[point.name] = result
        return result

    started = time.time()
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    try:
        # One Ray for every point; side by side, each point gets the CPUs a run
        # alone would (Ray's CPUs are what it schedules by, not a limit on cores).
        cpus = (os.cpu_count() or 1) * args.jobs
        with (
            engine_for_runs(engine, env, work, ray, cpus, client_workers(args)) as running,
            closing(WarmFlwrPool(env, work, len(points), spare=args.jobs)) as warm,
            simulation_superlink(env, work, warm=not args.cold_simulation) as superlink,
        ):
            write_connection(flwr_home, superlink.address)
            link = SweepLink(env, work, stage_app(APP_DIR, work), warm)
            install_app(link.app, [flwr_home])  # points side by side race otherwise
            if running.head is not None:
                running.head.wait_serving()  # each point's Ray waits for the rest
            setup = time.time() - started
            print(
                f"[sweep] SuperLink on {superlink.address}; {running.describe()}, for "
                f"every point ({setup:.1f} s)",
                flush=True,
            )
            try:
                for pt, (opts, over) in zip(points, checked, strict=True):
                    futures.append(
                        pool.submit(run_and_keep, pt, opts, over, link, out_dir, interrupt)
                    )
                _wait_all(futures)
            except KeyboardInterrupt as exc:
                # The signal may land inside a submission, losing that future or
                # the pool's record of the thread it started: wait on the points
                # themselves. Queued points return "not started"; one running stops
                # its run (flwr stop). A second interrupt ends this.
                interrupt.set(exc.args[0] if exc.args else "SIGINT (Ctrl-C)")
                print(f"[sweep] interrupted ({interrupt.how}); stopping", flush=True)
                interrupt.wait_for_runs()
            done = [finished[p.name] for p in points if p.name in finished]
            print_amortised(setup, done, time.time() - started)
    except KeyboardInterrupt as exc:
        interrupt.set(exc.args[0] if exc.args else "SIGINT (Ctrl-C)")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        stop_processes(descendants(), grace=LEFTOVER_GRACE_S)
    status = NOT_STARTED if interrupt.how else Outcome.FAILED.value
    rows = [finished.get(p.name) or _result(p, status, {}) for p in points]
    return rows, interrupt.how


def _wait_all(futures: list[Future[PointResult]]) -> None:
    """Wait for every point; poll so that a signal reaches this (the main) thread."""
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
        for future in done:
            future.result()  # a bug in a point's thread ends the sweep


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The sweep's options, with the preset's defaults filled in."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    p.add_argument(
        "--partitioners",
        nargs="+",
        choices=PARTITIONERS,
        help="default: the preset's partitioner, else iid and dirichlet",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--privacy-mode",
        choices=[m for m in PRIVACY_MODES if m != "none"],
        help="unit of the private points: sample (record) or client; default: the "
        "preset's, else sample (the reference points are non-private)",
    )
    p.add_argument("--clients", type=int, help="default: the preset's, else 10")
    p.add_argument("--rounds", type=int, help="default: the preset's, else 5")
    p.add_argument("--preset", choices=sorted(PRESETS), help="recipe for every point")
    p.add_argument(
        "--task",
        "--dataset",  # its name before tasks
        dest="task",
        help=f"a built-in task ({', '.join(task_names())}) or package.module:attribute; "
        "default: the preset's, else digits",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    add_simulation_options(p)
    p.add_argument(
        "--cold-simulation",
        action="store_true",
        help="start each point's flwr-simulation process from scratch, as Flower's "
        "SuperLink does (default: forked from a template that imported Flower, Ray "
        "and torch once, while the SuperLink started: docs/simulation.md)",
    )
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=3600.0,
        help="seconds for each point's run (finite, > 0)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="federations at once on the one SuperLink (each uses ~2 cores)",
    )
    p.add_argument("--no-reference", action="store_true", help="skip the non-private runs")
    p.add_argument("--out", type=Path, help="default: results/sweep-<UTC time>")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    preset = PRESETS[args.preset].run_config if args.preset else {}
    if args.privacy_mode is None:
        args.privacy_mode = preset.get("privacy-mode", "sample")
    if args.partitioners is None:
        args.partitioners = (
            [preset["partitioner"]] if "partitioner" in preset else ["iid", "dirichlet"]
        )
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the grid; exit 2 if a point's options are bad, 130 if interrupted, 1 if
    any point failed."""
    args = parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out_dir = (args.out or Path("results", f"sweep-{stamp}")).resolve()
    points = grid(args)
    try:
        checked = check_points(points, args, out_dir)
        choose_engine(args.engine, resolve_ray_address(args.ray_address))
    except ConfigError as exc:
        print(f"[sweep] configuration error: {exc}", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"[sweep] {len(points)} federations, {args.jobs} at a time -> {out_dir}", flush=True
    )
    try:
        rows, interrupted_by = run_grid(points, checked, args, out_dir)
    except (RuntimeError, TimeoutError) as exc:  # e.g. the SuperLink did not start
        print(f"[sweep] the sweep's SuperLink failed: {exc}", file=sys.stderr)
        return 1
    write_table(rows, out_dir)
    if any(r.accuracy is not None for r in rows):
        plot(rows, out_dir)
        print(f"[sweep] plot: {out_dir / 'accuracy_vs_epsilon.png'}", flush=True)
    print((out_dir / "sweep.md").read_text(), flush=True)
    print(f"[sweep] table: {out_dir / 'sweep.csv'}", flush=True)
    if interrupted_by is not None:
        print(f"[sweep] interrupted by {interrupted_by}", file=sys.stderr, flush=True)
        return Outcome.INTERRUPTED.exit_code
    finished = {o.value for o in Outcome if o.finished}
    return 0 if all(r.status in finished for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
