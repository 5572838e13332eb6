"""Grad-sample mode ``ghost``: Opacus' ghost clipping inside privfed's DP-SGD loop.

Opacus 1.6's fast gradient clipping (``GradSampleModuleFastGradientClipping`` with
``use_ghost_clipping=True``, driven by ``DPLossFastGradientClipping``) gets
Σᵢ clip(∇ℓᵢ) from two backward passes. The first computes per-sample gradient
norms: for ``Linear`` layers from activations and output gradients alone (the
"ghost" norm, no per-sample gradient is formed); for other layers, ``Conv2d``
among them, from per-sample gradients that are dropped once their norms are
known. The second backpropagates Σᵢ cᵢ·ℓᵢ with cᵢ = min(1, C/(‖∇ℓᵢ‖ + 1e-6)),
which leaves the clipped sum in ``p.grad``.

Only that arithmetic is Opacus'. The Poisson batches, the Gaussian noise (drawn
from the round's generator, OS entropy) and the accounting stay privfed's
(:func:`client.training.dp_training.train_private`): neither Opacus' optimizer nor
its privacy engine runs, so its default RNG, its data loader and its accountant
never touch a step. Opacus is imported only when this mode is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn


class _Criterion:
    """The task's loss as the criterion object Opacus expects (a ``reduction``)."""

    def __init__(self, loss_fn: Callable[..., torch.Tensor]) -> None:
        self.loss_fn = loss_fn
        self.reduction = "sum"

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, target, reduction=self.reduction)


class _GradClearer:
    """What Opacus' two-pass backward needs of an optimizer: clearing ``p.grad``
    between the passes. The step itself (noise, update) is privfed's."""

    loss_reduction = "sum"

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


class GhostClipper:
    """Clipped per-sample gradient sums of a batch through Opacus' ghost clipping."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        max_grad_norm: float,
    ) -> None:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        self.params = [p for p in model.parameters() if p.requires_grad]
        # loss_reduction "sum": norms are those of ∇ℓᵢ, not of ∇ℓᵢ/B
        self.module = GradSampleModuleFastGradientClipping(
            model,
            batch_first=True,
            loss_reduction="sum",
            max_grad_norm=max_grad_norm,
            use_ghost_clipping=True,
        )
        self._clearer = _GradClearer(self.params)
        self._loss = DPLossFastGradientClipping(
            self.module, self._clearer, _Criterion(loss_fn), loss_reduction="sum"
        )

    def clipped_batch(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[dict[nn.Parameter, torch.Tensor], float]:
        """Σᵢ clip(∇ℓᵢ) per trainable parameter, and Σᵢ ℓᵢ, for a non-empty batch."""
        self._clearer.zero_grad()
        loss = self._loss(self.module(x), y)
        with warnings.catch_warnings():
            # Opacus' hooks fire on the first layer, whose input needs no gradient
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()  # Opacus: norms pass, clip factors, Σᵢ cᵢ·ℓᵢ pass
        sums = {
            p: p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params
        }
        self._clearer.zero_grad()
        return sums, loss.item()

    def close(self) -> None:
        """Remove Opacus' hooks and the attributes it set on the parameters."""
        self.module.cleanup()
