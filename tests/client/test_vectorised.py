"""A group's batched local training equals each client's own ``train_non_private``.

The batched path (client/training/vectorised.py) must train every client on the
batches its own generator draws, with torch's SGD update, so that the weights (and
the reported mean loss) equal the one-by-one path's up to float rounding: a
client-level update that silently trained on another client's batches, or skipped
a step, would change what the server clips and noises.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from client.training import vectorised
from client.training.dp_training import train_non_private
from common.config import RunConfig
from common.tasks.models import build_model


def _cfg(task: str, momentum: float, epochs: int, batch: int) -> RunConfig:
    return RunConfig.from_run_config(
        {"task": task, "privacy-mode": "client", "momentum": momentum,
         "local-epochs": epochs, "batch-size": batch, "learning-rate": 0.5,
         "target-epsilon": 0.0, "noise-multiplier": 1.0}
    )  # fmt: skip


def _shards(task: str, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (64,) if task == "digits" else (1, 28, 28)
    gen = torch.Generator().manual_seed(3)
    return [
        (torch.randn(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen))
        for n in sizes
    ]


@pytest.mark.parametrize(
    ("task", "momentum", "epochs", "batch", "sizes"),
    [
        ("fashion-mnist", 0.0, 3, 3, [6, 6, 6, 6]),  # the fmnist-client-eps3 recipe
        ("fashion-mnist", 0.9, 2, 4, [6, 5, 6, 9, 5]),  # ragged last batches, sizes mixed
        ("digits", 0.9, 2, 8, [20, 20, 13]),
    ],
)
def test_batched_training_equals_one_by_one(
    task: str, momentum: float, epochs: int, batch: int, sizes: list[int]
) -> None:
    cfg = _cfg(task, momentum, epochs, batch)
    model = build_model(task, 10, seed=1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    shards = _shards(task, sizes)
    seeds = [100 + i for i in range(len(sizes))]
    batched = vectorised.train_many(
        model, shards, cfg, [torch.Generator().manual_seed(s) for s in seeds]
    )
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())  # untouched
    for (x, y), seed, got in zip(shards, seeds, batched, strict=True):
        alone = build_model(task, 10, seed=1)
        outcome = train_non_private(alone, x, y, cfg, torch.Generator().manual_seed(seed))
        for name, p in alone.named_parameters():
            assert not torch.equal(p.detach(), start[name])  # it trained
            torch.testing.assert_close(got.state[name], p.detach(), rtol=1e-4, atol=1e-5)
        assert got.mean_loss == pytest.approx(outcome.mean_loss, rel=1e-5)


def _change(model: torch.nn.Module, start: dict[str, torch.Tensor]) -> list[np.ndarray]:
    return [v.detach().numpy() - start[k].numpy() for k, v in model.state_dict().items()]


def test_the_handler_takes_its_own_precomputed_change_once() -> None:
    cfg = _cfg("digits", 0.0, 1, 8)
    model = build_model("digits", 10, seed=1)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shards = _shards("digits", [16, 16])
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    vectorised.precompute(model, [4, 7], 3, shards, cfg, gens)
    try:
        taken = vectorised.take_change(7, 3)
        assert taken is not None
        keys, change = taken
        assert keys == list(model.state_dict())
        # The same numbers as the one-by-one path: load, copy the trained in, subtract.
        mine = build_model("digits", 10, seed=1)
        trained = vectorised.train_many(
            model, shards, cfg, [torch.Generator().manual_seed(s) for s in (1, 2)]
        )[1]
        with torch.no_grad():
            for name, p in mine.named_parameters():
                p.copy_(trained.state[name])
        for got, expected in zip(change, _change(mine, start), strict=True):
            np.testing.assert_array_equal(got, expected)
            assert np.any(got != 0)  # it trained
        # Taken once: a second call (another round's instruction) trains afresh.
        assert vectorised.take_change(7, 3) is None
        assert vectorised.take_change(4, 3) is not None
        assert vectorised.take_change(4, 4) is None  # another round's: never this one
    finally:
        vectorised.forget()
    assert not vectorised._PRECOMPUTED and not vectorised._START


def test_frozen_parameters_stay_as_they_were() -> None:
    """A task may freeze layers: plain SGD leaves them, and so must the batched path."""
    cfg = _cfg("digits", 0.9, 2, 8)
    model = build_model("digits", 10, seed=1)
    first = next(model.parameters())
    first.requires_grad_(False)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shards = _shards("digits", [16, 16])
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    vectorised.precompute(model, [0, 1], 1, shards, cfg, gens)
    try:
        for pid, ((x, y), seed) in enumerate(zip(shards, (1, 2), strict=True)):
            alone = build_model("digits", 10, seed=1)
            next(alone.parameters()).requires_grad_(False)
            train_non_private(alone, x, y, cfg, torch.Generator().manual_seed(seed))
            taken = vectorised.take_change(pid, 1)
            assert taken is not None
            _, change = taken
            assert not np.any(change[0])  # the frozen parameter: no change at all
            for got, expected in zip(change, _change(alone, start), strict=True):
                np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    finally:
        vectorised.forget()


def test_models_with_state_or_randomness_are_not_batched() -> None:
    assert vectorised.can_vectorise(build_model("digits", 10, seed=0))
    assert not vectorised.can_vectorise(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    assert not vectorised.can_vectorise(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)))
