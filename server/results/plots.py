"""PNG plots of a run: central accuracy and max cumulative ε against rounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _line_plot(xs: list[int], ys: list[float], ylabel: str, title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(xs, ys, marker="o")
    ax.set(xlabel="round", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_rounds(rounds: list[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """Write ``accuracy.png`` and (for a private run) ``epsilon.png``; return paths."""
    xs = [r["round"] for r in rounds]
    accuracy = [r["central"]["accuracy"] for r in rounds]
    written = [
        _line_plot(xs, accuracy, "central test accuracy", title, out_dir / "accuracy.png")
    ]
    eps = [r.get("max_epsilon") for r in rounds]
    if any(e is not None for e in eps):
        first = next(r for r in rounds if r.get("accountant"))
        unit = (
            "client-level ε"
            if first.get("privacy_unit") == "client"
            else "max ε per record"
        )
        label = f"cumulative {unit} ({first['accountant']}, δ={first['delta']:g})"
        ys = [e if e is not None else float("nan") for e in eps]
        written.append(_line_plot(xs, ys, label, title, out_dir / "epsilon.png"))
    return written
