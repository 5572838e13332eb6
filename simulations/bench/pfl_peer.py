"""The peer measurement: Apple's pfl-research on privfed's client-level workload.

Runs in its own virtual environment, since pfl pins its own dependencies and privfed
does not depend on it::

    python3 -m venv /tmp/pflvenv
    /tmp/pflvenv/bin/pip install "pfl[pytorch]==0.6.0" "torch==2.13.0"
    /tmp/pflvenv/bin/python simulations/bench/pfl_peer.py --rounds 10

The workload is the one privfed's ``fmnist-client-eps3`` preset runs with
``features = "pixels"``: Fashion-MNIST over 10,000 clients of 6 records, 100 clients
per round, 6 local SGD steps (3 epochs of batch 3 at lr 0.5), each update clipped to
C = 1, Gaussian noise z·C on the sum (``CentrallyAppliedPrivacyMechanism``), server
SGD with momentum 0.9, the 26,010-parameter tanh CNN, central evaluation on the
10,000 test images every round. Prints one JSON line: per-round seconds (median
over rounds 2..T), launch to exit, accuracy after each round, peak RSS. It imports
nothing from privfed (only numpy, torch and pfl), so it runs in pfl's venv.

``--records FILE.npz`` runs a tabular workload instead: the encoded records and the
clients' shards privfed itself uses (written by ``simulations.bench.scale
--pfl-python``), a zero-initialised logistic regression, and the same local and
central settings (``--local-epochs``, ``--batch-size``, ``--cohort``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

STARTED = time.monotonic()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

DATA = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
MEAN, STD = 0.2860, 0.3530  # published training-set constants, as privfed's task uses


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped) as a numpy array; the header gives the shape."""
    raw = gzip.decompress(path.read_bytes())
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(part: str) -> tuple[np.ndarray, np.ndarray]:
    """Normalised images (N, 1, 28, 28) float32 and int64 labels of ``train``/``t10k``."""
    x = read_idx(DATA / f"{part}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    y = read_idx(DATA / f"{part}-labels-idx1-ubyte.gz").astype(np.int64)
    return ((x - MEAN) / STD)[:, None], y


class _PflModel(nn.Module):
    """``self.net`` with the loss and metrics hooks pfl's PyTorchModel calls."""

    net: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:  # noqa: A002
        self.eval() if eval else self.train()
        return nn.functional.cross_entropy(self(x), y.long())  # pfl hands floats

    @torch.no_grad()
    def metrics(
        self, x: torch.Tensor, y: torch.Tensor, eval: bool = True
    ) -> dict[str, Any]:  # noqa: A002
        from pfl.metrics import Weighted

        self.eval()
        logits = self(x)
        y = y.long()
        loss = nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct = (logits.argmax(1) == y).sum().item()
        return {"loss": Weighted(loss, len(x)), "accuracy": Weighted(correct, len(x))}


class TanhCNN(_PflModel):
    """privfed's TanhCNN28 (Papernot et al. 2021)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 8, stride=2, padding=2), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, 10),
        )  # fmt: skip


class Logistic(_PflModel):
    """privfed's zero-initialised logistic regression (``tabular_models``)."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Linear(num_features, num_classes)
        nn.init.zeros_(self.net.weight)
        nn.init.zeros_(self.net.bias)


Shards = dict[int, list[np.ndarray]]


def image_workload(args: argparse.Namespace) -> tuple[Shards, list[np.ndarray], nn.Module]:
    """Fashion-MNIST: ``--clients`` shards of ``--records`` images, the tanh CNN."""
    x, y = load("train")
    order = np.random.default_rng(args.seed).permutation(len(x))[
        : args.clients * args.records
    ]
    shards = {
        u: [x[order[u * args.records : (u + 1) * args.records]],
            y[order[u * args.records : (u + 1) * args.records]]]
        for u in range(args.clients)
    }  # fmt: skip
    return shards, list(load("t10k")), TanhCNN()


def records_workload(path: Path) -> tuple[Shards, list[np.ndarray], nn.Module]:
    """privfed's encoded records and shards, as written to ``path``."""
    data = np.load(path)
    x, y = data["x_train"], data["y_train"]
    bounds = data["shard_offsets"]
    indices = data["shard_indices"]
    shards = {
        u: [x[indices[bounds[u] : bounds[u + 1]]], y[indices[bounds[u] : bounds[u + 1]]]]
        for u in range(len(bounds) - 1)
    }
    classes = int(data["num_classes"])
    return shards, [data["x_test"], data["y_test"]], Logistic(x.shape[1], classes)


def main(argv: list[str] | None = None) -> int:
    """Run the peer and print its figures as one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--records", default="6", help="records per client, or an .npz")
    p.add_argument("--cohort", type=int, default=100)
    p.add_argument("--local-epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=3)
    p.add_argument("--learning-rate", type=float, default=0.5)
    p.add_argument("--noise-multiplier", type=float, default=0.7129)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel
    from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.records.endswith(".npz"):
        shards, (x_test, y_test), net = records_workload(Path(args.records))
    else:
        args.records = int(args.records)
        shards, (x_test, y_test), net = image_workload(args)
    training = FederatedDataset.from_slices(
        shards, get_user_sampler("random", list(shards))
    )
    mechanism = CentrallyAppliedPrivacyMechanism(
        GaussianMechanism(clipping_bound=1.0, relative_noise_stddev=args.noise_multiplier)
    )
    backend = SimulatedBackend(
        training_data=training, val_data=None, postprocessors=[mechanism]
    )
    model = PyTorchModel(
        model=net,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0, momentum=0.9),
    )
    stamps: list[float] = []
    accuracy: list[float] = []

    class Stamps(TrainingProcessCallback):  # type: ignore[misc]
        """The end of each round, and its central accuracy."""

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):  # type: ignore[no-untyped-def]
            stamps.append(time.monotonic())
            for name, value in aggregate_metrics:
                if "accuracy" in str(name) and "Central" in str(name):
                    accuracy.append(float(getattr(value, "overall_value", value)))
            return False, Metrics()

    evaluation = CentralEvaluationCallback(
        Dataset(raw_data=[x_test, y_test]),
        model_eval_params=NNEvalHyperParams(local_batch_size=min(len(x_test), 10_000)),
        frequency=1,
    )
    params = NNAlgorithmParams(
        central_num_iterations=args.rounds, evaluation_frequency=1,
        train_cohort_size=args.cohort, val_cohort_size=None,
    )  # fmt: skip
    train = NNTrainHyperParams(
        local_learning_rate=args.learning_rate,
        local_num_epochs=args.local_epochs,
        local_batch_size=args.batch_size,
    )
    begun = time.monotonic()
    FederatedAveraging().run(
        algorithm_params=params, backend=backend, model=model,
        model_train_params=train, model_eval_params=NNEvalHyperParams(local_batch_size=3),
        callbacks=[evaluation, Stamps()],
    )  # fmt: skip
    rounds = np.diff([begun, *stamps]).tolist()
    print(
        json.dumps(
            {
                "system": "pfl 0.6.0",
                "rounds": args.rounds,
                "per_round_median_s": statistics.median(rounds[1:] or rounds),
                "round_seconds": [round(r, 3) for r in rounds],
                "launch_to_exit_s": round(time.monotonic() - STARTED, 2),
                "accuracy": accuracy,
                "clients": len(shards),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
