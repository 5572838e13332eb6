"""Named, tuned recipes: run-config keys that ``--preset NAME`` applies before options.

Each preset is measured in BENCHMARKS.md with the command that reproduces it;
explicit options (``--rounds``, ``--set k=v`` …) still override single keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A recipe: what it is for, and the run-config keys it sets."""

    description: str
    run_config: Mapping[str, Any]
    clients: int | None = None  # --clients when not given; None: the launcher's default


_FMNIST_EPS3 = {
    "task": "fashion-mnist",
    "features": "scattering",  # ScatterNet + linear (Tramèr & Boneh 2021)
    "num-rounds": 10,
    "local-epochs": 2,
    "batch-size": 512,  # expected Poisson batch; q = 1/12 of a 6,000-example shard
    "learning-rate": 4.0,
    "momentum": 0.9,
    "max-grad-norm": 0.1,
    "target-epsilon": 3.0,  # σ calibrated so every client ends at ε ≤ 3 (δ = 1e-5)
    "noise-multiplier": 0.0,
    "local-test-fraction": 0.0,  # all local data trains; the server's test set scores
    "fraction-evaluate": 0.0,
}

# Client-level DP-FedAvg over 10,000 devices of 6 records each (see BENCHMARKS.md).
_FMNIST_CLIENT_EPS3 = {
    "task": "fashion-mnist",
    "features": "scattering",
    "privacy-mode": "client",
    "client-sampling-rate": 0.01,  # Poisson: 100 clients expected per round
    "num-rounds": 100,
    "local-epochs": 3,
    "batch-size": 3,  # 6 local steps on a 6-record shard
    "learning-rate": 0.5,
    "momentum": 0.0,
    "clipping": "fixed",
    "client-clip-norm": 1.0,
    "server-learning-rate": 1.0,
    "server-momentum": 0.9,
    "target-epsilon": 3.0,  # z calibrated once for 100 rounds at q = 0.01, δ = 1e-5
    "noise-multiplier": 0.0,
    "delta": 1e-5,
    "local-test-fraction": 0.0,
    "fraction-evaluate": 0.0,
}

# Tabular federations with natural sites (docs/tabular.md; BENCHMARKS.md "Tabular
# federations"): one client per site, σ calibrated per site for ε ≤ 1 (δ 1e-5).
_TABULAR = {
    "partitioner": "sites", "privacy-mode": "sample", "num-rounds": 10,
    "local-epochs": 5, "batch-size": 256, "momentum": 0.0, "max-grad-norm": 1.0,
    "target-epsilon": 1.0, "noise-multiplier": 0.0, "delta": 1e-5,
    "update-compression": "none",  # a handful of parameters: nothing to save
    "local-test-fraction": 0.0, "fraction-evaluate": 0.0,
}  # fmt: skip

# DP LoRA on MiniLM over Pang & Lee's sentences (docs/text.md; BENCHMARKS.md "Text").
_SENTIMENT_LORA_EPS8 = {
    "task": "sentiment", "partitioner": "iid", "privacy-mode": "sample",
    "grad-sample-mode": "hooks",  # the text tasks' per-sample path (Opacus hooks)
    "num-rounds": 5, "local-epochs": 2,
    "batch-size": 256,  # expected Poisson batch: q = 1/7 on a 1,600-sentence shard
    "learning-rate": 0.1, "momentum": 0.9, "max-grad-norm": 1.0,
    "target-epsilon": 8.0, "noise-multiplier": 0.0, "delta": 1e-5,
    "lora-rank": 8, "lora-alpha": 16.0, "lora-target-modules": "query,value",
    "update-compression": "none",  # 298 kB of float32 adapters and head per reply
    "torch-threads": 2, "local-test-fraction": 0.0, "fraction-evaluate": 0.0,
}  # fmt: skip

PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "fmnist-eps3": Preset(
            "Fashion-MNIST, IID, per-client sample-level ε ≤ 3: ScatterNet features, "
            "linear model, DP-SGD B 512, lr 4, momentum 0.9, C 0.1, 10 rounds x 2 epochs",
            MappingProxyType(_FMNIST_EPS3),
        ),
        "fmnist-eps3-dirichlet": Preset(
            "the fmnist-eps3 recipe on a Dirichlet(0.5) label split",
            MappingProxyType(
                {**_FMNIST_EPS3, "partitioner": "inner-dirichlet", "dirichlet-alpha": 0.5}
            ),
        ),
        "fmnist-client-eps3": Preset(
            "Fashion-MNIST over 10,000 clients, client-level ε ≤ 3 (δ 1e-5): "
            "DP-FedAvg, Poisson q 0.01, 100 rounds, 6 local steps at lr 0.5, C 1, "
            "server momentum 0.9, ScatterNet + linear",
            MappingProxyType(_FMNIST_CLIENT_EPS3),
            clients=10_000,
        ),
        "fmnist-client-eps3-dirichlet": Preset(
            "the fmnist-client-eps3 recipe, each client's labels drawn from its own "
            "Dirichlet(0.5) class mix (inner-dirichlet)",
            MappingProxyType(
                {
                    **_FMNIST_CLIENT_EPS3,
                    "partitioner": "inner-dirichlet",
                    "dirichlet-alpha": 0.5,
                }
            ),
            clients=10_000,
        ),
        "credit-eps1": Preset(
            "Lending Club loans, one client per US Census region (4), per-site "
            "sample-level ε ≤ 1 (δ 1e-5): logistic regression on 5 public-schema "
            "inputs, DP-SGD B 256, lr 2, C 1, 10 rounds x 5 epochs",
            MappingProxyType({**_TABULAR, "task": "lending-club", "learning-rate": 2.0}),
            clients=4,
        ),
        "medical-eps1": Preset(
            "Wilms tumour relapse (NWTS-3/4), one client per trial (2), per-site "
            "sample-level ε ≤ 1 (δ 1e-5): logistic regression, DP-SGD B 256, lr 1, C 1, "
            "10 rounds x 5 epochs",
            MappingProxyType({**_TABULAR, "task": "nwtco", "learning-rate": 1.0}),
            clients=2,
        ),
        "sentiment-lora-eps8": Preset(
            "Pang & Lee movie-review sentences over 2 clients (IID), per-client "
            "sample-level ε ≤ 8 (δ 1e-5): MiniLM frozen, LoRA r 8 on query/value and a "
            "linear head trained with DP-SGD (Opacus hooks), B 256, lr 0.1, momentum "
            "0.9, C 1, 5 rounds x 2 epochs; only adapters and head travel (needs "
            "the text extra and python3-pattern)",
            MappingProxyType(_SENTIMENT_LORA_EPS8),
            clients=2,
        ),
    }
)


def preset_help() -> str:
    """One line per preset, for ``--help``."""
    return "; ".join(f"{name}: {p.description}" for name, p in PRESETS.items())
