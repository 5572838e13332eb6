"""Check the audit itself: ``python -m simulations.audit --self-test``.

Audits privfed's DP mechanisms (the client's DP-SGD step, the server's DP-FedAvg
aggregator) in-process with white-box Dirac canaries, once as they are and once with
each planted bug (noise ×0.5, clipping skipped, noise drawn once and reused), and
prints claimed ε, audited lower bound and verdict (:mod:`simulations.audit.self_test`).

    python -m simulations.audit --self-test                  # ε 1, 3, 8; 20,000 canaries
    python -m simulations.audit --self-test --canaries 5000 --epsilons 8 --out DIR

Exit 0 when every planted bug is flagged and no correct mechanism is; 1 otherwise
(a correct mechanism flagged is a bug in privfed or in the audit; a planted bug
missed means the audit is too weak at these settings: more canaries), naming each
row; 2 on bad options.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

from simulations.audit.report import markdown_table, plot_bounds, plot_scores, write_tables
from simulations.audit.self_test import (
    CORRECT,
    MECHANISMS,
    VARIANTS,
    SelfTestRow,
    SelfTestSetup,
    run_self_test,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The self-test's options."""
    p = argparse.ArgumentParser(
        prog="python -m simulations.audit", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--self-test",
        action="store_true",
        required=True,
        help="audit privfed's mechanisms, correct and with planted bugs",
    )
    p.add_argument(
        "--canaries",
        type=int,
        default=20_000,
        help="Dirac canaries m (default 20000, in runs of at most 5000 each)",
    )
    p.add_argument("--rounds", type=int, default=2, help="releases T (even; default 2)")
    p.add_argument(
        "--epsilons",
        type=float,
        nargs="+",
        default=[1.0, 3.0, 8.0],
        help="claimed ε of the whole run, σ calibrated to each",
    )
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--accountant", default="rdp", help="the ε accountant (rdp, prv)")
    p.add_argument(
        "--mechanisms",
        nargs="+",
        choices=["sample", "client"],
        default=["sample", "client"],
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the auditor's design (inclusion); noise is OS entropy",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default results/audit-self-test-<time>)",
    )
    return p.parse_args(argv)


def _progress(row: SelfTestRow) -> None:
    print(
        f"[self-test] {row.mechanism}, {row.variant}: audited ε ≥ "
        f"{row.bound.epsilon_lower_bound:.3f} vs claimed ε {row.claimed_epsilon:.3f} "
        f"({row.accountant}, δ={row.delta:g}, per {row.unit}, whole run); "
        f"audited μ ≥ {row.gdp.mu_lower_bound:.3f} "
        f"vs claimed μ {row.claimed_mu:.3f} -> {row.verdict}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the self-test; write the table and plots; exit 1 on a false alarm or a
    missed bug."""
    args = parse_args(argv)
    try:
        setup = SelfTestSetup(args.canaries, args.rounds, args.delta, args.accountant,
                              args.seed)  # fmt: skip
    except ValueError as exc:
        print(f"[self-test] {exc}", file=sys.stderr)
        return 2
    mechanisms = tuple(m for m in MECHANISMS if m.split("-")[0] in args.mechanisms)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = (args.out or Path("results", f"audit-self-test-{stamp}")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with warnings.catch_warnings():  # Opacus' notes on RDP orders and PRV at q = 1
        warnings.simplefilter("ignore")
        rows = run_self_test(setup, tuple(args.epsilons), mechanisms, VARIANTS, _progress)
    write_tables(rows, out)
    plot_bounds(rows, out)
    plot_scores(rows, out)
    print(markdown_table(rows), flush=True)
    print(f"[self-test] {len(rows)} audits in {time.monotonic() - started:.0f} s -> {out}")
    wrong = [
        r
        for r in rows
        if (r.variant == CORRECT) == (r.flagged or r.gdp_flagged)  # alarm xor bug
    ]
    for r in wrong:
        print(
            f"[self-test] {r.mechanism}, {r.variant} at claimed ε "
            f"{r.claimed_epsilon:.3f}: {r.verdict}",
            file=sys.stderr,
        )
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
