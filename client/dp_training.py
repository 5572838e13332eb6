"""One round of local training: DP-SGD with Opacus, or plain SGD when non-private."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.config import RunConfig
from common.dp_plan import RoundPlan


class AccountingMismatch(RuntimeError):
    """Opacus took other steps than the round was planned (and budgeted) for."""


@dataclass(frozen=True)
class TrainOutcome:
    """What a local round did."""

    mean_loss: float
    history: tuple[tuple[float, float, int], ...]  # this round's Opacus history


def _optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)


def train_private(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: RunConfig,
    plan: RoundPlan,
    noise_multiplier: float,
) -> TrainOutcome:
    """DP-SGD: Poisson sampling at ``plan.sample_rate``, clipping, Gaussian noise.

    A fresh Opacus accountant records only this round; the caller appends its
    history to the client's cumulative ledger.
    """
    loader = DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size)
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off; the seed key is documented instead.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=cfg.accountant)
        dp_model, optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=_optimizer(model, cfg),
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=cfg.grad_sample_mode,
        )
    if dp_loader.sample_rate != plan.sampler_rate:
        raise AccountingMismatch(
            f"Opacus samples at q={dp_loader.sample_rate}, planned q={plan.sampler_rate}"
        )
    with warnings.catch_warnings():
        # Opacus' hooks fire on input-free modules; harmless and noisy.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        mean_loss = _run_epochs(dp_model, optimizer, dp_loader, cfg.local_epochs)
    history = tuple(tuple(h) for h in engine.accountant.history)
    planned = ((noise_multiplier, plan.sample_rate, plan.steps),)
    if history != planned:
        raise AccountingMismatch(f"Opacus recorded {history}, planned {planned}")
    return TrainOutcome(mean_loss=mean_loss, history=history)  # type: ignore[arg-type]


def train_non_private(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RunConfig
) -> TrainOutcome:
    """Plain mini-batch SGD (the non-private reference)."""
    loader = DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size, shuffle=True)
    mean_loss = _run_epochs(model, _optimizer(model, cfg), loader, cfg.local_epochs)
    return TrainOutcome(mean_loss=mean_loss, history=())


def _run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    epochs: int,
) -> float:
    model.train()
    criterion = nn.CrossEntropyLoss()
    total, count = 0.0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(xb) == 0:  # an empty Poisson batch still costs a (noise-only) step
                optimizer.step()
                continue
            loss = criterion(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(xb)
            count += len(xb)
    return total / count if count else float("nan")
