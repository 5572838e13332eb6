"""Cost of the per-round checkpoint beside the plain ``model.pt`` save it joins.

For the digits default (tanh MLP) and the Fashion-MNIST ScatterNet linear model,
times, interleaved, what the server writes after each round: ``model.pt``
(:meth:`ResultsWriter.save_model`) and ``checkpoint.pt`` (model, FedAvgM momentum,
strategy state and a round record with 10 clients, digest, atomic replace).

    python -m simulations.bench.checkpoint --repeats 21
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from common.config import RunConfig
from common.tasks.models import build_model
from server.results.checkpoint import Checkpoint, checkpoint_bytes, write_checkpoint
from server.results.run_folder import ResultsWriter

MODELS = {
    "digits (tanh MLP)": ("digits", "pixels"),
    "fashion-mnist (ScatterNet + linear)": ("fashion-mnist", "scattering"),
}


def _record(clients: int = 10) -> dict:
    """A round record the size of a 10-client sample-level round."""
    client = {"epsilon": 1.0, "partition_id": 0, "node_id": 1, "status": "trained",
              "history": [[1.0, 0.02, 500]], "delta": 1e-5}  # fmt: skip
    return {"round": 5, "central": {"accuracy": 0.8, "loss": 0.5},
            "clients": [dict(client, partition_id=i) for i in range(clients)]}  # fmt: skip


def bench(dataset: str, features: str, repeats: int, folder: Path) -> dict[str, float]:
    """Median seconds of each write, and the sizes of both files."""
    cfg = RunConfig(task=dataset, features=features, results_dir=str(folder))
    model = build_model(dataset, seed=0, features=features).state_dict()
    arrays = ArrayRecord(model)
    writer = ResultsWriter(folder, cfg)
    ckpt = Checkpoint(
        round=5, model=model,
        momentum=tuple(np.ones(tuple(t.shape), np.float32) for t in model.values()),
        strategy={}, run_config=cfg.to_run_config(),
        runs=({"run_id": 1, "first_round": 1, "last_round": 5, "wall_seconds": 1.0},),
        round_record=_record(), epsilon_by_partition={str(i): 1.0 for i in range(10)},
    )  # fmt: skip
    model_pt, checkpoint_pt = [], []
    for _ in range(repeats):  # interleaved, so machine load hits both alike
        start = time.perf_counter()
        writer.save_model(arrays)
        model_pt.append(time.perf_counter() - start)
        start = time.perf_counter()
        write_checkpoint(folder, ckpt)
        checkpoint_pt.append(time.perf_counter() - start)
    return {
        "parameters": sum(t.numel() for t in model.values()),
        "model_pt_ms": 1000 * statistics.median(model_pt),
        "checkpoint_ms": 1000 * statistics.median(checkpoint_pt),
        "model_pt_kb": (folder / "model.pt").stat().st_size / 1024,
        "checkpoint_kb": len(checkpoint_bytes(ckpt)) / 1024,
    }


def main(argv: list[str] | None = None) -> None:
    """Print one Markdown row per model."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=21)
    args = p.parse_args(argv)
    print("| model | parameters | model.pt (ms) | checkpoint.pt (ms) | model.pt (KiB) "
          "| checkpoint.pt (KiB) |\n|---|---|---|---|---|---|")  # fmt: skip
    for name, (dataset, features) in MODELS.items():
        with tempfile.TemporaryDirectory(prefix="privfed-bench-ckpt-") as tmp:
            r = bench(dataset, features, args.repeats, Path(tmp))
        print(
            f"| {name} | {r['parameters']:,} | {r['model_pt_ms']:.2f} | "
            f"{r['checkpoint_ms']:.2f} | {r['model_pt_kb']:.0f} | "
            f"{r['checkpoint_kb']:.0f} |"
        )


if __name__ == "__main__":
    main()
