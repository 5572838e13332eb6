"""What a sweep writes and prints about its points: the table, the plot, launch times."""

from __future__ import annotations

import csv
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from simulations.sweep import PointResult


def print_amortised(setup: float, rows: list[PointResult], wall: float) -> None:
    """Launch to round 1 per run, with the start of the SuperLink and Ray shared
    among the runs, and the sweep's whole wall time per run (``wall``: from the
    sweep's start until its last point returned)."""
    launches = [r.launch_to_round_1_seconds for r in rows]
    seen = [x for x in launches if x is not None]
    if not seen:
        return
    amortised = (setup + sum(seen)) / len(seen)
    print(
        f"[sweep] launch to round 1: {amortised:.1f} s per run amortised over "
        f"{len(seen)} runs (SuperLink and engine start {setup:.1f} s once; per run median "
        f"{statistics.median(seen):.1f} s: {', '.join(f'{x:.1f}' for x in seen)}); "
        f"{wall / len(rows):.1f} s of the sweep's wall time per run",
        flush=True,
    )


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
