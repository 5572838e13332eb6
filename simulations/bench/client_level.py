"""Client-level runs side by side: accuracy, wall time, and ε under four accountants.

For each results folder of a ``privacy-mode = "client"`` run (or a non-private
reference), prints a Markdown row: central accuracy, wall time, and the ε of the
same noise and rounds as privfed reports it (Opacus RDP, Poisson amplification), as
Google's dp-accounting computes it (RDP and PLD), and as Flower 1.42's own
``RdpAccountant`` would report it with ``SamplingMethod.POISSON`` and with
``NO_AMPLIFICATION`` (what its DP strategies use, since they sample a fixed number
of nodes). ``--run PRESET`` first runs ``simulations.run --preset PRESET``.

    python -m simulations.bench.client_level --run fmnist-client-eps3 \\
        --run fmnist-client-eps3-dirichlet --reference fmnist-client-eps3
    python -m simulations.bench.client_level results/RUN1 results/RUN2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dp_accounting
from flwr.serverapp import PrivacyConfig, RdpAccountant
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    SamplingMethod,
)

from simulations.presets import PRESETS

REPO = Path(__file__).resolve().parents[2]


def dp_accounting_epsilons(block: dict[str, Any]) -> tuple[float, float]:
    """(RDP, PLD) ε of the run's (z, q, rounds) history with dp-accounting."""
    rdp = dp_accounting.rdp.RdpAccountant()
    pld = dp_accounting.pld.PLDAccountant()
    for z, q, rounds in block["history"]:
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
            int(rounds),
        )
        rdp.compose(event)
        pld.compose(event)
    return rdp.get_epsilon(block["delta"]), pld.get_epsilon(block["delta"])


def flower_epsilon(block: dict[str, Any], sampling: SamplingMethod) -> float:
    """ε from Flower's own RdpAccountant for the same noise and rounds."""
    population = int(block["population"])
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=block["delta"],
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=sampling,
        )
    )
    for z, q, rounds in block["history"]:
        cohort = max(1, round(q * population))
        accountant.compose(GaussianPrivacyEvent(z, cohort, population), int(rounds))
    return float(accountant.get_epsilon(block["delta"]))


def row(results: Path, wall: float | None = None) -> str:
    """One Markdown row for a finished run folder (``wall``: the command's seconds)."""
    summary = json.loads((results / "summary.json").read_text())
    accuracy = (summary.get("final_central") or {}).get("accuracy")
    config = json.loads((results / "config.json").read_text())["run_config"]
    name = f"{config['partitioner']}, {summary['rounds_completed']} rounds"
    cells = [name, f"{accuracy:.4f}" if accuracy is not None else "—"]
    block = summary.get("client_level")
    if block is None:
        cells += ["non-private"] + ["—"] * 3
    else:
        rdp, pld = dp_accounting_epsilons(block)
        cells += [
            f"{block['epsilon']:.3f} (z {block['noise_multiplier']:.4f}, "
            f"q {block['sampling_rate']:g}, δ {block['delta']:g})",
            f"{rdp:.3f} / {pld:.3f}",
            f"{flower_epsilon(block, SamplingMethod.POISSON):.3f}",
            f"{flower_epsilon(block, SamplingMethod.NO_AMPLIFICATION):.1f}",
        ]
    seconds = wall if wall is not None else summary.get("wall_seconds", 0.0)
    cells.append(f"{seconds / 60:.1f} min")
    return "| " + " | ".join(cells) + " |"


def run_preset(preset: str, out: Path, extra: list[str]) -> tuple[Path, float]:
    """Run ``simulations.run --preset PRESET`` into ``out``: (folder, wall seconds)."""
    argv = [sys.executable, "-m", "simulations.run", "--preset", preset,
            "--results-dir", str(out), "--timeout", "7200", *extra]  # fmt: skip
    print(f"[bench] {' '.join(argv[1:])}", flush=True)
    started = time.monotonic()
    code = subprocess.call(argv, cwd=REPO)
    if code != 0:
        raise SystemExit(f"[bench] {preset} exited {code}")
    return out, time.monotonic() - started


def reference_options(preset: str) -> list[str]:
    """The same recipe without DP: no clipping or noise, a fixed-size cohort of q·n."""
    rate = PRESETS[preset].run_config["client-sampling-rate"]
    return ["--privacy-mode", "none", "--set", f"fraction-train={rate}"]


def main(argv: list[str] | None = None) -> int:
    """Run the requested presets, then print one row per results folder."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="*", type=Path, help="finished run folders")
    p.add_argument("--run", action="append", default=[], help="a preset to run first")
    p.add_argument(
        "--reference", action="append", default=[], help="run a preset non-private"
    )
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="privfed-client-level-"))
    folders: list[tuple[Path, float | None]] = [(f, None) for f in args.results]
    for preset in args.run:
        folders.append(run_preset(preset, work / preset, []))
    for preset in args.reference:
        folders.append(
            run_preset(preset, work / f"{preset}-none", reference_options(preset))
        )
    print(
        "| run | accuracy | client-level ε, privfed (Opacus RDP) | dp-accounting RDP / "
        "PLD | Flower RdpAccountant, POISSON | Flower, NO_AMPLIFICATION | wall |"
    )
    print("|---|---|---|---|---|---|---|")
    for folder, wall in folders:
        print(row(folder, wall))
    return 0


if __name__ == "__main__":
    sys.exit(main())
