"""One round of local training: DP-SGD with Opacus, or plain SGD when non-private."""

from __future__ import annotations

import bisect
import itertools
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from client.training.per_sample_grads import PerSampleClipper
from client.training.sgd import PlainSGD
from common.config import RunConfig
from common.ledger.privacy_ledger import make_accountant
from common.privacy.dp_sgd_plan import RoundPlan
from common.privacy.randomness import gaussian_noise
from common.tasks.registry import get_task

if TYPE_CHECKING:  # Opacus' engine is imported only by the modes that use it
    from torch.utils.data import DataLoader

PHYSICAL_BATCH = 256  # larger Poisson batches run in chunks (faster on CPU)
# Modes whose batches, noise and accounting are privfed's own loop (_train_direct);
# the others run through Opacus' make_private (_train_opacus).
PRIVFED_LOOP_MODES = ("direct", "ghost")


class AccountingMismatch(RuntimeError):
    """Opacus took other steps than the round was planned (and budgeted) for."""


@dataclass(frozen=True)
class TrainOutcome:
    """What a local round did."""

    mean_loss: float
    history: tuple[tuple[float, float, int], ...]  # this round's Opacus history


def _optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)


def _plain_sgd(model: nn.Module, cfg: RunConfig) -> PlainSGD:
    """torch's SGD update without a ``torch.optim`` object (:mod:`client.training.sgd`)."""
    return PlainSGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)


def train_private(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: RunConfig,
    plan: RoundPlan,
    noise_multiplier: float,
    generator: torch.Generator,
    canaries: Sequence[int] = (),
) -> TrainOutcome:
    """DP-SGD: Poisson sampling at ``plan.sample_rate``, clipping, Gaussian noise.

    Every Poisson mask and noise draw comes from ``generator`` (OS entropy per round,
    see :mod:`common.privacy.randomness`). The round's history (σ, q, steps) is checked
    against the plan; the caller appends it to the client's cumulative ledger.
    ``canaries``: flat parameter coordinates of this client's included gradient
    canaries, only in a simulated audit (:mod:`common.audit.gradient_canaries`).
    """
    if canaries and cfg.grad_sample_mode != "direct":
        raise ValueError("gradient canaries are planted on the 'direct' path only")
    if cfg.grad_sample_mode in PRIVFED_LOOP_MODES:
        mean_loss, steps = _train_direct(
            model, x, y, cfg, plan, noise_multiplier, generator, canaries
        )
        history = ((noise_multiplier, plan.sample_rate, steps),)
    else:
        mean_loss, history = _train_opacus(
            model, x, y, cfg, plan, noise_multiplier, generator
        )
    planned = ((noise_multiplier, plan.sample_rate, plan.steps),)
    if history != planned:
        raise AccountingMismatch(f"training recorded {history}, planned {planned}")
    return TrainOutcome(mean_loss=mean_loss, history=history)


class _BatchClipper(Protocol):
    def clipped_batch(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[dict[nn.Parameter, torch.Tensor], float]: ...

    def close(self) -> None: ...


class _DirectClipper:
    """:class:`PerSampleClipper` behind the batch interface ``ghost`` shares."""

    def __init__(
        self, model: nn.Module, loss_fn: Callable[..., torch.Tensor], max_grad_norm: float
    ) -> None:
        self.clipper = PerSampleClipper(model)
        self.model, self.loss_fn, self.max_grad_norm = model, loss_fn, max_grad_norm

    def clipped_batch(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[dict[nn.Parameter, torch.Tensor], float]:
        loss = self.loss_fn(self.model(x), y, reduction="sum")
        return self.clipper.clipped_sums(loss, self.max_grad_norm), loss.item()

    def close(self) -> None:
        self.clipper.close()


def _batch_clipper(
    mode: str, model: nn.Module, loss_fn: Callable[..., torch.Tensor], max_grad_norm: float
) -> _BatchClipper:
    if mode == "ghost":  # imports Opacus
        from client.training.ghost_clipping import GhostClipper

        return GhostClipper(model, loss_fn, max_grad_norm)
    return _DirectClipper(model, loss_fn, max_grad_norm)


def _train_direct(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: RunConfig,
    plan: RoundPlan,
    noise_multiplier: float,
    generator: torch.Generator,
    canaries: Sequence[int] = (),
) -> tuple[float, int]:
    """DP-SGD in privfed's loop: Opacus' sampling, clipping and noise arithmetic.

    The clipped sums come from :class:`PerSampleClipper` (mode ``direct``) or from
    Opacus' ghost clipping (:mod:`client.training.ghost_clipping`, mode ``ghost``);
    batches, noise and steps are the same for both.

    Each step draws a Poisson batch (every example in with probability
    ``plan.sampler_rate``), sums per-sample clipped gradients, adds N(0, (σC)²) per
    coordinate and divides by the expected batch size int(N·q) at the accounted
    rate q, as Opacus' ``make_private(poisson_sampling=True)`` does; an empty batch
    still takes a noise-only step. The noise is drawn as Opacus' ``secure_mode``
    draws it (:func:`gaussian_noise`). Returns the mean loss and the steps taken.
    """
    loss_fn = get_task(cfg.task).loss_function()
    clipper = _batch_clipper(cfg.grad_sample_mode, model, loss_fn, cfg.max_grad_norm)
    optimizer = _plain_sgd(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    expected_batch = plan.expected_batch_size
    std = noise_multiplier * cfg.max_grad_norm
    planted = _canary_places(params, canaries)
    canary_draws = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    model.train()
    total, count, steps = 0.0, 0, 0
    try:
        for _ in range(plan.steps):
            mask = torch.rand(len(x), generator=generator) < plan.sampler_rate
            batch = mask.nonzero().squeeze(1)
            # canaries are Poisson-sampled like records, from their own OS-entropy
            # stream: the DP draws stay exactly those of a run without them
            sampled = (
                (torch.rand(len(planted), generator=canary_draws) < plan.sampler_rate)
                if planted
                else torch.zeros(0, dtype=torch.bool)
            )
            sums: dict[nn.Parameter, torch.Tensor] = {}
            # Clipping is per sample, so chunks sum exactly; an empty batch has none.
            for chunk in batch.split(PHYSICAL_BATCH) if len(batch) else ():
                chunk_sums, chunk_loss = clipper.clipped_batch(x[chunk], y[chunk])
                for p, summed in chunk_sums.items():
                    sums[p] = sums[p] + summed if p in sums else summed
                total += chunk_loss
                count += len(chunk)
            for k in sampled.nonzero().flatten().tolist():  # a canary's gradient: C·e_j
                i, offset = planted[k]
                summed = sums.get(params[i], torch.zeros_like(params[i]))
                summed.view(-1)[offset] += cfg.max_grad_norm
                sums[params[i]] = summed
            for p in params:
                summed = sums.get(p, torch.zeros_like(p))
                noise = gaussian_noise(std, p, generator)
                p.grad = (summed + noise) / expected_batch
            optimizer.step()
            steps += 1
    finally:
        clipper.close()
    return (total / count if count else float("nan")), steps


def _canary_places(
    params: list[nn.Parameter], canaries: Sequence[int]
) -> list[tuple[int, int]]:
    """(parameter index, offset) of each flat coordinate, in ``model.parameters()``
    order (the server flattens the model's arrays in the same order)."""
    ends = list(itertools.accumulate(p.numel() for p in params))
    places = []
    for j in canaries:
        i = bisect.bisect_right(ends, j)
        if i >= len(params):
            raise ValueError(f"canary coordinate {j} is outside the model's {ends[-1]}")
        places.append((i, j - (ends[i - 1] if i else 0)))
    return places


def _train_opacus(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: RunConfig,
    plan: RoundPlan,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[float, tuple[tuple[float, float, int], ...]]:
    """DP-SGD through Opacus' ``make_private`` (modes hooks, ew, functorch).

    The Poisson loader is built from the plan, not from the records: it samples at
    ``plan.sampler_rate`` (len = steps per epoch, so Opacus accounts at
    ``plan.sample_rate``), and the optimizer divides by ``plan.expected_batch_size``.
    Both the loader's sampler and the optimizer's noise draw from ``generator``.
    """
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import TensorDataset

    loader = DPDataLoader(
        TensorDataset(x, y), sample_rate=plan.sampler_rate, generator=generator
    )
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off: it needs torchcsprng, which has no
        # torch 2.13 build; the generator is seeded from OS entropy instead.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine()
        engine.accountant = make_accountant(cfg.accountant)  # the registry's, by name
        dp_model, optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=_optimizer(model, cfg),
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=False,  # the loader above already is Opacus' Poisson loader
            grad_sample_mode=cfg.grad_sample_mode,
            noise_generator=generator,
        )
    optimizer.expected_batch_size = plan.expected_batch_size  # not int(N·q) of the data
    if len(dp_loader) * cfg.local_epochs != plan.steps:
        raise AccountingMismatch(
            f"Opacus would take {len(dp_loader)} steps per epoch, planned {plan.steps}"
        )
    with warnings.catch_warnings():
        # Opacus' hooks fire on input-free modules; harmless and noisy.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        mean_loss = _run_epochs(
            dp_model,
            optimizer,
            dp_loader,
            cfg.local_epochs,
            get_task(cfg.task).loss_function(),
        )
    history = tuple(tuple(h) for h in engine.accountant.history)
    return mean_loss, history  # type: ignore[return-value]


def train_non_private(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: RunConfig,
    generator: torch.Generator,
) -> TrainOutcome:
    """Plain mini-batch SGD over shuffled batches (the non-private reference)."""
    optimizer = _plain_sgd(model, cfg)
    loss_fn = get_task(cfg.task).loss_function()
    model.train()
    total = 0.0
    for _ in range(cfg.local_epochs):
        for batch in torch.randperm(len(x), generator=generator).split(cfg.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[batch]), y[batch], reduction="mean")
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
    return TrainOutcome(mean_loss=total / (len(x) * cfg.local_epochs), history=())


def _run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    epochs: int,
    loss_fn: Callable[..., torch.Tensor],
) -> float:
    model.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(xb) == 0:
                # An empty Poisson batch still costs a step: zero-length per-sample
                # gradients clip and sum to zero, so the step adds noise only (ew and
                # functorch cannot run a forward pass on zero examples).
                for p in model.parameters():
                    if p.requires_grad:
                        p.grad_sample = p.new_zeros((0, *p.shape))
                optimizer.step()
                continue
            loss = loss_fn(model(xb), yb, reduction="mean")
            loss.backward()
            optimizer.step()
            total += loss.item() * len(xb)
            count += len(xb)
    return total / count if count else float("nan")
