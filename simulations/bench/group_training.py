"""What a virtual-client group saves per client: batched SGD and the scattering port.

Times, in this process and on one thread (a simulated SuperNode's), the local
training of ``--clients`` clients of ``--records`` records (``fmnist-client-eps3``:
3 epochs of batch 3 at lr 0.5) one by one (``train_non_private``) and batched over
the clients (``client/training/vectorised.py``), for the tanh CNN and the digits MLP;
and the scattering features of one client's records by kymatio and by the port
(``common/data/scattering_port.py``). Prints a Markdown table of medians.

    python -m simulations.bench.group_training --clients 50 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from client.training import vectorised
from client.training.dp_training import train_non_private
from common.config import RunConfig
from common.data.features import scattering_front
from common.data.scattering_port import fast_front
from common.tasks.models import build_model


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: first calls build kernels and caches
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _training_row(task: str, clients: int, records: int, repeats: int) -> str:
    cfg = RunConfig.from_run_config(
        {"task": task, "privacy-mode": "client", "local-epochs": 3, "batch-size": 3,
         "learning-rate": 0.5, "target-epsilon": 0.0, "noise-multiplier": 1.0}
    )  # fmt: skip
    shape = (64,) if task == "digits" else (1, 28, 28)
    shards = [
        (torch.randn(records, *shape), torch.randint(0, 10, (records,)))
        for _ in range(clients)
    ]
    model = build_model(task, 10, seed=1)

    def one_by_one() -> None:
        for x, y in shards:
            copy = build_model(task, 10, seed=1)
            copy.load_state_dict(model.state_dict())
            train_non_private(copy, x, y, cfg, torch.Generator().manual_seed(0))

    def batched() -> None:
        generators = [torch.Generator().manual_seed(0) for _ in shards]
        vectorised.train_many(model, shards, cfg, generators)

    alone = _median_seconds(one_by_one, repeats) / clients * 1000
    together = _median_seconds(batched, repeats) / clients * 1000
    return (
        f"| local training, {task} model, {clients} clients × {records} records | "
        f"{alone:.2f} ms/client | **{together:.2f} ms/client** | {alone / together:.1f}× |"
    )


def _features_row(records: int, repeats: int) -> str:
    images = torch.rand(records, 1, 28, 28)
    kymatio, port = scattering_front(), fast_front()
    with torch.no_grad():
        slow = _median_seconds(lambda: kymatio(images), repeats) / records * 1000
        fast = _median_seconds(lambda: port(images), repeats) / records * 1000
    return (
        f"| scattering features of one client's {records} images | {slow:.2f} ms/image "
        f"(kymatio) | **{fast:.2f} ms/image** (port) | {slow / fast:.1f}× |"
    )


def main(argv: list[str] | None = None) -> int:
    """Time both and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--records", type=int, default=6)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| what | one by one | in a group | speed-up |")
    print("|---|---|---|---|")
    for task in ("fashion-mnist", "digits"):
        print(_training_row(task, args.clients, args.records, args.repeats), flush=True)
    print(_features_row(args.records, args.repeats), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
