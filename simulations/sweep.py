"""Run a grid of federations (target ε × partitioner × seed) and tabulate them.

Each grid point is one ``simulations.run`` federation in its own subprocess (its
own SuperLink, cleaned up by that script). A non-private run per partitioner and
seed gives the reference line. Writes ``sweep.csv``, ``sweep.md`` and
``accuracy_vs_epsilon.png`` into the sweep folder.

    python -m simulations.sweep --epsilons 1 3 8 --partitioners iid dirichlet \\
        --seeds 0 1 --clients 10 --rounds 5 --jobs 1
    python -m simulations.sweep --preset fmnist-eps3 --epsilons 1 2 3 \\
        --partitioners iid dirichlet
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.config import (  # noqa: E402
    PARTITIONERS,
    PRIVACY_MODES,
    ConfigError,
    RunConfig,
)
from server.run_outcome import Outcome  # noqa: E402
from simulations.presets import PRESETS  # noqa: E402
from simulations.run import parse_args as run_options  # noqa: E402
from simulations.run_options import build_overrides  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


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
    ]  # fmt: skip
    for option in ("clients", "preset", "rounds", "dataset"):  # unset: preset's/default
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


def check_points(points: list[GridPoint], args: argparse.Namespace, out_dir: Path) -> None:
    """Validate every point's options and run keys before any federation starts."""
    for point in points:
        try:
            build_overrides(run_options(point_options(point, args, out_dir)))
        except ConfigError as exc:
            raise ConfigError(f"grid point {point.name}: {exc}") from None


def run_point(point: GridPoint, args: argparse.Namespace, out_dir: Path) -> PointResult:
    """Run one federation through ``simulations.run`` and read its summary."""
    results = out_dir / point.name
    argv = [sys.executable, "-m", "simulations.run", *point_options(point, args, out_dir)]
    log_path = out_dir / f"{point.name}.log"
    print(f"[sweep] start {point.name}", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.call(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    summary_path = results / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    status = summary.get("status", Outcome.FAILED.value)
    if code != 0:
        status = f"{status} (exit {code})"
    result = PointResult(
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
    )
    print(f"[sweep] done  {point.name}: {status}, accuracy {result.accuracy}", flush=True)
    return result


def write_table(rows: list[PointResult], out_dir: Path) -> None:
    """``sweep.csv`` and ``sweep.md``, one row per grid point."""
    fields = list(asdict(rows[0]))
    with open(out_dir / "sweep.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    lines = [
        "| target ε | partitioner | seed | accuracy | max ε (accountant, δ) | status | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "non-private" if r.target_epsilon is None else f"{r.target_epsilon:g}"
        acc = "—" if r.accuracy is None else f"{r.accuracy:.4f}"
        eps = (
            "—"
            if r.max_epsilon is None
            else f"{r.max_epsilon:.3f} ({r.accountant}, {r.delta:g})"
        )
        secs = "—" if r.wall_seconds is None else f"{r.wall_seconds:.0f}"
        cells = [target, r.partitioner, str(r.seed), acc, eps, r.status, secs]
        lines.append("| " + " | ".join(cells) + " |")
    (out_dir / "sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(rows: list[PointResult], out_dir: Path) -> Path:
    """Accuracy against achieved max ε per partitioner, non-private as a line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for part in sorted({r.partitioner for r in rows}):
        pts = sorted(
            (r.max_epsilon, r.accuracy)
            for r in rows
            if r.partitioner == part
            and r.max_epsilon is not None
            and r.accuracy is not None
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", linestyle="", label=part)
        ref = [
            r.accuracy for r in rows if r.partitioner == part and r.target_epsilon is None
        ]
        ref = [a for a in ref if a is not None]
        if ref:
            ax.axhline(
                sum(ref) / len(ref), linestyle="--", alpha=0.6, label=f"{part} non-private"
            )
    accountants = {
        f"{r.accountant}, δ={r.delta:g}" for r in rows if r.accountant not in (None, "none")
    }
    unit = "cumulative ε per client"
    unit += " (client-level)" if "client" in {r.privacy_unit for r in rows} else ""
    ax.set(
        xlabel=f"{unit} ({'; '.join(sorted(accountants)) or 'n/a'})",
        ylabel="central test accuracy",
        ylim=(0, 1),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "accuracy_vs_epsilon.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
        "--dataset",
        choices=["digits", "fashion-mnist", "mnist"],
        help="default: the preset's, else digits",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--jobs", type=int, default=1, help="federations at once (each uses ~2 cores)"
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
    """Run the grid; exit 2 if a point's options are bad, 1 if any point failed."""
    args = parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out_dir = (args.out or Path("results", f"sweep-{stamp}")).resolve()
    points = grid(args)
    try:
        check_points(points, args, out_dir)
    except ConfigError as exc:
        print(f"[sweep] configuration error: {exc}", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"[sweep] {len(points)} federations, {args.jobs} at a time -> {out_dir}", flush=True
    )
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda pt: run_point(pt, args, out_dir), points))
    write_table(rows, out_dir)
    plot(rows, out_dir)
    print((out_dir / "sweep.md").read_text(), flush=True)
    print(f"[sweep] table: {out_dir / 'sweep.csv'}", flush=True)
    print(f"[sweep] plot: {out_dir / 'accuracy_vs_epsilon.png'}", flush=True)
    finished = {o.value for o in Outcome if o.finished}
    return 0 if all(r.status in finished for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
