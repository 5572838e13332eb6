"""PNG plots of a run: central accuracy and max cumulative ε against rounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_rounds(rounds: list[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """Write ``accuracy.png`` and ``epsilon.png``; return their paths."""
    xs = [r["round"] for r in rounds]
    written = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(xs, [r["central"]["accuracy"] for r in rounds], marker="o")
    ax.set(xlabel="round", ylabel="central test accuracy", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    written.append(out_dir / "accuracy.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    eps = [r.get("max_epsilon") for r in rounds]
    if any(e is not None for e in eps):
        first = next(r for r in rounds if r.get("accountant"))
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(xs, [e if e is not None else float("nan") for e in eps], marker="o")
        ax.set(
            xlabel="round",
            ylabel=f"max cumulative ε ({first['accountant']}, δ={first['delta']:g})",
            title=title,
        )
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        written.append(out_dir / "epsilon.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
