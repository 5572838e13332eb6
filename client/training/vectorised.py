"""The local training of a group of virtual clients, all at once (client-level DP).

A simulated SuperNode that hosts many clients (client/virtual_clients.py) trains,
in a client-level round, each sampled client's copy of the global model with
plain SGD on its own shard (:func:`client.training.dp_training.train_non_private`);
the clipping and the noise come after, per client and on the server. Run one by
one, a round of 50 clients of 6 records pays 50 × 6 tiny forward and backward
passes; here the clients with the same number of records take their steps
together, as one batched pass (``torch.func.vmap`` over per-client parameters,
``functional_call`` of the task's own model and loss).

Each client still draws its own batches from its own generator, in the order
:func:`train_non_private` draws them, so the two paths train on the same batches
and give the same weights up to float rounding (``tests/client/test_vectorised.py``).
The result is only a precomputation: the ClientApp handler of each client takes it
(:func:`take_change`) where it would have trained, after its own policy and
ledger checks; a client whose handler refuses never uses it. Taken, it is already
the change from the global model, so the handler builds no model of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.config import RunConfig
from common.tasks.registry import get_task

log = logging.getLogger("privfed.client")

ENABLED = True  # tests switch it off to compare against the one-by-one path
_RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass(frozen=True)
class Trained:
    """One client's trained weights (parameters and buffers) and its mean loss."""

    state: dict[str, torch.Tensor]
    mean_loss: float


# (partition, round) -> its precomputed training; filled and emptied per group message
_PRECOMPUTED: dict[tuple[int, int], Trained] = {}
# round -> the global model's state (every key, in order) the group trained from
_START: dict[int, list[tuple[str, np.ndarray]]] = {}


def can_vectorise(model: nn.Module) -> bool:
    """Plain parameters only: no buffers (BatchNorm's running statistics) and no
    random layers, whose per-client state or draws a batched pass would share."""
    if list(model.buffers()):
        return False
    return not any(isinstance(m, _RANDOM_MODULES) for m in model.modules())


def train_many(
    model: nn.Module,
    shards: Sequence[tuple[torch.Tensor, torch.Tensor]],
    cfg: RunConfig,
    generators: Sequence[torch.Generator],
) -> list[Trained]:
    """Each shard's :func:`train_non_private` from ``model``'s weights, batched over
    the shards of one size; ``model`` itself is left as it was."""
    from torch.func import functional_call, grad_and_value, vmap

    loss_fn = get_task(cfg.task).loss_function()
    # Only what plain SGD would move: a frozen parameter gets no gradient there.
    start = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    model.train()

    def loss_of(params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor):
        return loss_fn(functional_call(model, params, (xb,)), yb, reduction="mean")

    step_of = vmap(grad_and_value(loss_of))
    out: list[Trained | None] = [None] * len(shards)
    by_size: dict[int, list[int]] = {}
    for i, (x, _) in enumerate(shards):
        by_size.setdefault(len(x), []).append(i)
    for n, members in by_size.items():
        if n == 0:
            raise ValueError("a client with no training records cannot train")
        xs = torch.stack([shards[i][0] for i in members])  # [k, n, ...]
        ys = torch.stack([shards[i][1] for i in members])  # [k, n]
        # Each client's permutations, drawn as train_non_private draws them.
        perms = torch.stack(
            [
                torch.stack(
                    [
                        torch.randperm(n, generator=generators[i])
                        for _ in range(cfg.local_epochs)
                    ]
                )
                for i in members
            ]
        )  # [k, epochs, n]
        k = len(members)
        params = {
            name: p.unsqueeze(0).repeat(k, *[1] * p.dim()) for name, p in start.items()
        }
        momentum: dict[str, torch.Tensor] = {}
        total = torch.zeros(k)
        rows = torch.arange(k).unsqueeze(1)
        for epoch in range(cfg.local_epochs):
            for batch in perms[:, epoch].split(cfg.batch_size, dim=1):  # [k, b]
                xb, yb = xs[rows, batch], ys[rows, batch]
                grads, losses = step_of(params, xb, yb)
                with torch.no_grad():
                    for name, g in grads.items():
                        if cfg.momentum:  # torch's SGD: the first buffer is the gradient
                            buf = momentum.get(name)
                            g = momentum[name] = (
                                g.clone()
                                if buf is None
                                else (buf.mul_(cfg.momentum).add_(g))
                            )
                        params[name] = params[name] - cfg.learning_rate * g
                total += losses.detach() * batch.shape[1]
        for j, i in enumerate(members):
            state = {name: p[j].clone() for name, p in params.items()}
            out[i] = Trained(state, float(total[j]) / (n * cfg.local_epochs))
    return [t for t in out if t is not None]


def precompute(
    model: nn.Module,
    partitions: Sequence[int],
    server_round: int,
    shards: Sequence[tuple[torch.Tensor, torch.Tensor]],
    cfg: RunConfig,
    generators: Sequence[torch.Generator],
) -> None:
    """Train ``partitions`` at once from ``model`` (the round's global model, as each
    client's handler would load it) and keep the results for :func:`take_change`."""
    _START[server_round] = [
        (name, value.detach().numpy().copy()) for name, value in model.state_dict().items()
    ]
    for pid, trained in zip(
        partitions, train_many(model, shards, cfg, generators), strict=True
    ):
        _PRECOMPUTED[(pid, server_round)] = trained


def forget() -> None:
    """Drop what a group message precomputed (used or not)."""
    _PRECOMPUTED.clear()
    _START.clear()


def take_change(
    partition_id: int, server_round: int
) -> tuple[list[str], list[np.ndarray]] | None:
    """This client's precomputed training as the change from the global model, for
    every state key in the model's order (zero where plain SGD moves nothing: frozen
    parameters), taken once; ``None`` when its group had none, and the handler trains.

    The same numbers as loading the global model, copying the trained parameters
    in and subtracting, without building a model per client (0.7 ms each).
    """
    trained = _PRECOMPUTED.pop((partition_id, server_round), None)
    if trained is None:
        return None
    start = _START[server_round]
    change = [
        trained.state[name].numpy() - before
        if name in trained.state
        else np.zeros_like(before)
        for name, before in start
    ]
    return [name for name, _ in start], change
