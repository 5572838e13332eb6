"""DP-SGD cost against plain SGD for one local epoch, each grad-sample mode.

Runs the client's own training functions (client.training.dp_training) on a shard
of a built-in task (``--dataset``: the 26,010-parameter tanh CNN of fashion-mnist
and mnist, the digits MLP), interleaving the non-private epoch and each DP mode
(privfed's ``direct``, Opacus' ``hooks``, ``ew``, ``functorch`` and ghost
clipping, ``ghost``), the order rotated every repetition so that a load change
does not always hit the same mode. Prints median seconds per epoch, and the
medians of the ratios to the non-private epoch and to ``direct`` measured in the
same repetition (under a loaded machine only those ratios compare). ``--clock cpu``
times the process' CPU seconds instead of wall seconds: on a machine shared with
other jobs that is steadier, as waiting for a core is not counted.

    python -m simulations.bench.dp_overhead --examples 6000 --batch-sizes 64 256
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from client.training.dp_training import train_non_private, train_private
from common.config import RunConfig
from common.data.datasets import load_dataset
from common.privacy.dp_sgd_plan import plan_dp_sgd_round
from common.privacy.randomness import round_generator
from common.tasks.models import build_model
from common.tasks.registry import task_names

MODES = ("direct", "hooks", "ew", "functorch", "ghost")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _epoch_seconds(
    cfg: RunConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    mode: str | None,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    model = build_model(cfg.task, seed=0)
    start = clock()  # a run is cfg.local_epochs epochs; the table shows per epoch
    if mode is None:
        train_non_private(model, x, y, cfg, round_generator())
    else:
        run_cfg = RunConfig(**{**cfg.__dict__, "grad_sample_mode": mode})
        plan = plan_dp_sgd_round(len(x), cfg.batch_size, cfg.local_epochs)
        train_private(model, x, y, run_cfg, plan, 1.0, round_generator())
    return (clock() - start) / cfg.local_epochs


def _measure(
    cfg: RunConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    modes: list[str],
    repeats: int,
    clock: Callable[[], float],
) -> dict[str, list[float]]:
    """Seconds per epoch of every run, by mode; one repetition runs each once."""
    runs: list[str | None] = [None, *modes]
    times: dict[str, list[float]] = {"non-private": [], **{m: [] for m in modes}}
    for rep in range(repeats):
        shift = rep % len(runs)
        for mode in runs[shift:] + runs[:shift]:
            seconds = _epoch_seconds(cfg, x, y, mode, clock)
            times[mode or "non-private"].append(seconds)
    return times


def _print_table(batch: int, times: dict[str, list[float]], modes: list[str]) -> None:
    """Median seconds, and median per-repetition ratios to non-private and direct."""
    base = times["non-private"]

    def ratio(mode: str, ref: list[float]) -> str:
        pairs = zip(times[mode], ref, strict=True)
        return f"{statistics.median(a / b for a, b in pairs):.2f}x"

    direct = times.get("direct")
    print(f"\nbatch {batch}\n\n| mode | s / epoch | DP / non-DP | mode / direct |")
    print("|---|---|---|---|")
    print(f"| non-private | {statistics.median(base):.3f} | 1.00 | |")
    for mode in modes:
        vs_direct = ratio(mode, direct) if direct else ""
        print(f"| {mode} | {statistics.median(times[mode]):.3f} | {ratio(mode, base)} "
              f"| {vs_direct} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Print a Markdown table per batch size."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=6000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--epochs", type=int, default=1, help="local epochs per timed run")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    p.add_argument("--dataset", default="fashion-mnist", choices=task_names())
    p.add_argument("--data-dir", default="", help="the dataset's files (run key data-dir)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, args.data_dir, 0)
    x = torch.from_numpy(data.x_train[: args.examples])
    y = torch.from_numpy(data.y_train[: args.examples])
    print(f"{args.dataset}, {len(x)} examples, {args.threads} threads, {args.epochs} "
          f"epochs a run, median of {args.repeats} interleaved repetitions, "
          f"{args.clock} clock")  # fmt: skip
    for batch in args.batch_sizes:
        cfg = RunConfig(
            task=args.dataset, batch_size=batch, num_rounds=1, local_epochs=args.epochs
        )
        times = _measure(cfg, x, y, args.modes, args.repeats, CLOCKS[args.clock])
        _print_table(batch, times, args.modes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
