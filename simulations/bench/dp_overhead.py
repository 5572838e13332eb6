"""DP-SGD cost against plain SGD for one local epoch, each Opacus grad-sample mode.

Runs the client's own training functions (client.training.dp_training) on a
Fashion-MNIST-sized shard with the 26,010-parameter tanh CNN, interleaving the
non-private epoch and each DP mode, and prints median seconds per epoch and the
ratio to the non-private epoch measured in the same repetition.

    python -m simulations.bench.dp_overhead --examples 6000 --batch-sizes 64 256
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from client.training.dp_training import train_non_private, train_private
from common.config import RunConfig
from common.data.datasets import load_dataset
from common.privacy.dp_sgd_plan import plan_dp_sgd_round
from common.privacy.randomness import round_generator
from common.tasks.models import build_model
from common.tasks.registry import task_names

MODES = ("direct", "hooks", "ew", "functorch")


def _epoch_seconds(
    cfg: RunConfig, x: torch.Tensor, y: torch.Tensor, mode: str | None
) -> float:
    model = build_model(cfg.task, seed=0)
    start = time.perf_counter()
    if mode is None:
        train_non_private(model, x, y, cfg, round_generator())
    else:
        run_cfg = RunConfig(**{**cfg.__dict__, "grad_sample_mode": mode})
        plan = plan_dp_sgd_round(len(x), cfg.batch_size, cfg.local_epochs)
        train_private(model, x, y, run_cfg, plan, 1.0, round_generator())
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Print a Markdown table per batch size."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=6000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--dataset", default="fashion-mnist", choices=task_names())
    p.add_argument("--data-dir", default="", help="the dataset's files (run key data-dir)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, args.data_dir, 0)
    x = torch.from_numpy(data.x_train[: args.examples])
    y = torch.from_numpy(data.y_train[: args.examples])
    print(f"{args.dataset}, {len(x)} examples, {args.threads} threads, "
          f"median of {args.repeats} interleaved repetitions")  # fmt: skip
    for batch in args.batch_sizes:
        cfg = RunConfig(task=args.dataset, batch_size=batch, num_rounds=1)
        times: dict[str, list[float]] = {"non-private": []}
        ratios: dict[str, list[float]] = {m: [] for m in args.modes}
        for _ in range(args.repeats):
            base = _epoch_seconds(cfg, x, y, None)
            times["non-private"].append(base)
            for mode in args.modes:
                seconds = _epoch_seconds(cfg, x, y, mode)
                times.setdefault(mode, []).append(seconds)
                ratios[mode].append(seconds / base)
        print(f"\nbatch {batch}\n\n| mode | s / epoch | DP / non-DP |\n|---|---|---|")
        print(f"| non-private | {statistics.median(times['non-private']):.2f} | 1.00 |")
        for mode in args.modes:
            secs, ratio = statistics.median(times[mode]), statistics.median(ratios[mode])
            print(f"| {mode} | {secs:.2f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
