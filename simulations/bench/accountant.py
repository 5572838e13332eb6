"""Cost of reporting cumulative ε: the ledger's cached path vs Opacus recomputation.

For a 100-round ledger (``--rounds``; one history entry per round: every round a distinct
(σ, q), the worst case; and the usual case of one merged (σ, q)), times the ε a
client reports after its latest round, interleaving the two methods. Then the cost
of a σ calibration at a small shard's rate (q 1/3, as a 10-client digits run's
nodes), made afresh and remembered (:mod:`common.privacy.calibration_cache`).

    python -m simulations.bench.accountant --repeats 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

from opacus.accountants import RDPAccountant

from common.ledger.privacy_ledger import PrivacyLedger
from common.privacy.accountants.rdp import _rdp_per_step
from common.privacy.calibration_cache import CACHE_ENV
from common.privacy.dp_sgd_plan import calibrate_gaussian_noise_multiplier

DELTA = 1e-5


def _ledger(distinct: bool, rounds: int) -> PrivacyLedger:
    ledger = PrivacyLedger("rdp", DELTA)
    for r in range(1, rounds + 1):
        sigma = 1.0 + 0.01 * r if distinct else 1.0
        ledger = ledger.extended(r, sigma, 1 / 50, 50)
    return ledger


def _opacus(ledger: PrivacyLedger) -> float:
    acc = RDPAccountant()
    acc.history = ledger.history()
    return acc.get_epsilon(delta=DELTA)


def _time(fn: Callable[[], float]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Print a Markdown table of median milliseconds per ε report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument(
        "--rounds", type=int, default=100, help="ledger length (the smoke test: 10)"
    )
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="Optimal order")
    print(f"| ledger ({args.rounds} rounds) | Opacus full recomputation "
          "| cached (first report) | cached (next round) | same ε |")  # fmt: skip
    print("|---|---|---|---|---|")
    for distinct in (True, False):
        ledger = _ledger(distinct, args.rounds)
        full, cold, warm = [], [], []
        for _ in range(args.repeats):
            full.append(_time(lambda led=ledger: _opacus(led)))
            _rdp_per_step.cache_clear()
            cold.append(_time(ledger.epsilon))
            next_round = ledger.extended(args.rounds + 1, 1.0, 1 / 50, 50)
            warm.append(_time(next_round.epsilon))
        reference = _opacus(ledger)
        same = abs(ledger.epsilon() - reference) <= 1e-9 * reference
        name = "distinct (σ, q) every round" if distinct else "one (σ, q), merged"
        cells = [statistics.median(x) * 1000 for x in (full, cold, warm)]
        row = f"| {name} | {cells[0]:.1f} ms | {cells[1]:.1f} ms | {cells[2]:.2f} ms"
        print(f"{row} | {same} |")
    _calibrations(args.repeats)
    return 0


def _calibrations(repeats: int) -> None:
    """σ for ε 8 over 15 steps at q 1/3: bisected afresh, then remembered and checked."""

    def calibrate() -> float:
        return calibrate_gaussian_noise_multiplier(8.0, DELTA, 1 / 3, 15, "rdp")

    fresh, remembered, sigmas = [], [], set()
    before = os.environ.get(CACHE_ENV)
    try:
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as folder:
                os.environ[CACHE_ENV] = folder  # an empty cache for each repeat
                _rdp_per_step.cache_clear()
                fresh.append(_time(calibrate))
                _rdp_per_step.cache_clear()
                remembered.append(_time(calibrate))
                sigmas.add(calibrate())
    finally:  # never leave the variable naming a deleted folder
        if before is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = before
    print("\n| σ calibration (q 1/3, 15 steps, ε 8) | afresh | remembered | same σ |")
    print("|---|---|---|---|")
    cells = [statistics.median(x) * 1000 for x in (fresh, remembered)]
    print(f"| median of {repeats} | {cells[0]:.0f} ms | {cells[1]:.0f} ms "
          f"| {len(sigmas) == 1} |")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
