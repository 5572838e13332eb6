"""An example task written outside privfed: wine cultivars from 13 lab measurements.

Copy this file anywhere, make it importable on every machine that runs a client
(``PYTHONPATH`` or an installed package), and name it by ``module:attribute``::

    PYTHONPATH=/path/to/folder python -m simulations.run --task my_task:TASK

docs/tasks.md walks through each part. Nothing here is privfed-internal: a task is
one :class:`~common.tasks.task.Task` holding how to read the records, how raw
records become model input (public constants only), the model, and what the run
reports. The module stays cheap to import (no torch, no scikit-learn at import):
every ClientApp message runs in a fresh process that imports it.

The data is scikit-learn's embedded copy of the UCI wine data (178 records, three
cultivars), so the example needs no download.
"""

from __future__ import annotations

from common.tasks.task import AffinePreprocessing, Task

FEATURES = (
    "alcohol", "malic_acid", "ash", "alcalinity_of_ash", "magnesium",
    "total_phenols", "flavanoids", "nonflavanoid_phenols", "proanthocyanins",
    "color_intensity", "hue", "od280/od315", "proline",
)  # fmt: skip
# Public reference ranges (rounded textbook ranges for red wines), NOT statistics of
# the training records: preprocessing constants reach every device in model.json
# and cost no privacy only if they were never computed from private data.
LOW = (11.0, 0.5, 1.0, 10.0, 70.0, 1.0, 0.3, 0.1, 0.4, 1.0, 0.5, 1.0, 250.0)
HIGH = (15.0, 6.0, 3.5, 30.0, 165.0, 4.0, 5.5, 0.7, 3.6, 13.0, 1.8, 4.0, 1700.0)
TEST_FRACTION = 0.25


def read_wine(task: Task, data_dir: str, seed: int, part: str):
    """``(x, y)`` of ``part``: a stratified 75/25 split by the run seed.

    May return ``(x, y, sites)`` instead, one site id per training record (a
    hospital, a branch), to let ``partitioner = "sites"`` give one client per site.
    privfed checks what this returns (shape, finiteness, labels 0..C-1).
    """
    from sklearn.datasets import load_wine  # heavy: only when the data is read
    from sklearn.model_selection import train_test_split

    bunch = load_wine()
    x_tr, x_te, y_tr, y_te = train_test_split(
        bunch.data, bunch.target, test_size=TEST_FRACTION, random_state=seed,
        stratify=bunch.target,
    )  # fmt: skip
    return (x_tr, y_tr) if part == "train" else (x_te, y_te)


def build_model(num_classes: int, features: str):
    """A small tanh MLP: Linear layers only, so every DP gradient path can train it
    (BatchNorm would be refused under DP; use GroupNorm or LayerNorm)."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(len(FEATURES), 32), nn.Tanh(), nn.Linear(32, num_classes)
    )


TASK = Task(
    name="wine",
    class_labels=("cultivar 0", "cultivar 1", "cultivar 2"),
    read_raw=read_wine,
    preprocessing=AffinePreprocessing(
        raw_shape=(len(FEATURES),),
        offset=LOW,
        scale=tuple(high - low for low, high in zip(LOW, HIGH, strict=True)),
    ),
    model=build_model,
    # Optional parts, at their defaults: loss=None (cross-entropy),
    # metrics="multiclass" ("binary" adds AUROC, AUPRC, Brier for two classes),
    # grad_sample_modes=("direct", "hooks", "ew", "functorch"), natural_sites=False.
)
