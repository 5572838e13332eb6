"""Audit privfed across ε: one-run canary audits beside the reported ε.

Each point is one ``simulations.run`` federation (run by the sweep's helpers) with
``audit = "one-run"``; a non-private run gives the reference. Writes
``audit-table.csv``, ``audit-table.md`` and ``audit-vs-epsilon.png`` (audited lower
bound against reported ε, with the line y = x that a sound run stays below).

    python -m simulations.audit_sweep          # digits, ε 1, 3, 8 and non-private
    python -m simulations.audit_sweep --preset fmnist-eps3 --canaries 1000 --epsilons 3

Every option of ``simulations.sweep`` (``--epsilons``, ``--seeds``, ``--clients``,
``--rounds``, ``--preset``, ``--set``, …) is accepted; ``--partitioners`` defaults to iid.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.config import ConfigError  # noqa: E402
from server.results.outcome import Outcome  # noqa: E402
from simulations import sweep  # noqa: E402

DIGITS_CANARIES = 500  # digits has 1,437 training records; at most half may be canaries


@dataclass(frozen=True)
class AuditRow:
    """One audited federation: a row of the table."""

    name: str
    target_epsilon: float | None  # None: non-private
    seed: int
    status: str
    reported_epsilon: float | None  # None: non-private (ε = ∞)
    accountant: str | None
    delta: float | None
    audited_lower_bound: float | None
    method: str | None
    canaries: int | None
    guesses: int | None
    correct: int | None
    confidence: float | None
    accuracy: float | None
    run_seconds: float
    white_box_lower_bound: float | None = None  # client-level: every round's release


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, float]:
    """The sweep's options plus ``--canaries``; the audit keys go into ``--set``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument(
        "--canaries",
        type=int,
        default=DIGITS_CANARIES,
        help=f"run key audit-canaries (default {DIGITS_CANARIES}, for digits)",
    )
    own, rest = p.parse_known_args(argv)
    if {"-h", "--help"} & set(rest):
        p.print_help()
        print("\nand every option of simulations.sweep:\n")
    if "--partitioners" not in rest:
        rest += ["--partitioners", "iid"]
    args = sweep.parse_args(rest)
    args.set += ['audit="one-run"', f"audit-canaries={own.canaries}"]
    return args, own.canaries


def audit_point(point: sweep.GridPoint, args: argparse.Namespace, out: Path) -> AuditRow:
    """Run one federation through the sweep's runner and read its audit block."""
    started = time.monotonic()
    result = sweep.run_point(point, args, out)
    path = out / point.name / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    audit = summary.get("audit") or {}
    row = AuditRow(
        name=point.name,
        target_epsilon=point.target_epsilon,
        seed=point.seed,
        status=result.status,
        reported_epsilon=result.max_epsilon,
        accountant=result.accountant,
        delta=result.delta,
        audited_lower_bound=audit.get("epsilon_lower_bound"),
        method=audit.get("method"),
        canaries=audit.get("canaries"),
        guesses=audit.get("guesses"),
        correct=audit.get("correct"),
        confidence=audit.get("confidence"),
        accuracy=result.accuracy,
        run_seconds=round(time.monotonic() - started, 1),
        white_box_lower_bound=(audit.get("white_box") or {}).get("epsilon_lower_bound"),
    )
    print(
        f"[audit] {point.name}: audited ε ≥ {_num(row.audited_lower_bound)} vs reported "
        f"ε {_reported(row)} ({row.correct}/{row.guesses} guesses right)",
        flush=True,
    )
    return row


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _reported(row: AuditRow) -> str:
    if row.target_epsilon is None:
        return "∞ (non-private)"
    if row.reported_epsilon is None:
        return "—"
    return f"{row.reported_epsilon:.3f} ({row.accountant}, δ={row.delta:g})"


def write_table(rows: list[AuditRow], out: Path) -> None:
    """``audit-table.csv`` and ``audit-table.md``."""
    with open(out / "audit-table.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    lines = [
        "| target ε | seed | reported ε | audited ε lower bound | white-box bound "
        "| method | canaries | correct / guesses | accuracy | status | run s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "non-private" if r.target_epsilon is None else f"{r.target_epsilon:g}"
        confidence = "" if r.confidence is None else f" ({r.confidence:.0%})"
        cells = [
            target,
            str(r.seed),
            _reported(r),
            _num(r.audited_lower_bound) + confidence,
            _num(r.white_box_lower_bound),
            r.method or "—",
            str(r.canaries or "—"),
            f"{r.correct} / {r.guesses}" if r.guesses else "—",
            "—" if r.accuracy is None else f"{r.accuracy:.4f}",
            r.status,
            f"{r.run_seconds:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "audit-table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(rows: list[AuditRow], out: Path) -> Path:
    """Audited lower bound against reported ε, with y = x; non-private as a line."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    pts = [
        (r.reported_epsilon, r.audited_lower_bound)
        for r in rows
        if r.reported_epsilon is not None and r.audited_lower_bound is not None
    ]
    top = max([x for x, _ in pts] + [y for _, y in pts] + [1.0])
    ax.plot([0, top], [0, top], "k--", alpha=0.5, label="y = x (reported ε)")
    if pts:
        ax.plot(*zip(*pts, strict=True), "o", label="DP runs (final model)")
    white = [
        (r.reported_epsilon, r.white_box_lower_bound)
        for r in rows
        if r.reported_epsilon is not None and r.white_box_lower_bound is not None
    ]
    if white:
        ax.plot(*zip(*white, strict=True), "s", label="DP runs (white-box, every round)")
    for r in rows:
        if r.target_epsilon is None and r.audited_lower_bound is not None:
            ax.axhline(r.audited_lower_bound, color="C3", alpha=0.6)
            ax.annotate(
                f"non-private: ε ≥ {r.audited_lower_bound:.2f}",
                (0, r.audited_lower_bound),
                textcoords="offset points",
                xytext=(4, 4),
                color="C3",
                fontsize=8,
            )
    ax.set(
        xlabel="reported ε (max over clients)",
        ylabel="audited ε lower bound (95 %, one run)",
        xlim=(0, top * 1.05),
        ylim=(0, top * 1.05),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = out / "audit-vs-epsilon.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the audits; exit 2 on bad options, 1 if any run failed or was not audited."""
    args, canaries = parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = (args.out or Path("results", f"audit-{stamp}")).resolve()
    points = sweep.grid(args)
    try:
        sweep.check_points(points, args, out)
    except ConfigError as exc:
        print(f"[audit] configuration error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"[audit] {len(points)} federations, {canaries} canaries each -> {out}", flush=True
    )
    rows = [audit_point(point, args, out) for point in points]
    write_table(rows, out)
    plot(rows, out)
    print((out / "audit-table.md").read_text(), flush=True)
    print(f"[audit] table: {out / 'audit-table.csv'}", flush=True)
    print(f"[audit] plot: {out / 'audit-vs-epsilon.png'}", flush=True)
    finished = {o.value for o in Outcome if o.finished}
    ok = all(r.status in finished and r.audited_lower_bound is not None for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
