"""torch's SGD update without a ``torch.optim.Optimizer`` object.

Why: constructing (or stepping) any ``torch.optim.Optimizer`` imports
``torch._dynamo`` on first use, 1.0-1.2 CPU-s and ~70 MB here, paid again by every
ClientApp process (each message runs in a fresh one). The update itself is torch's
functional ``torch.optim.sgd.sgd``, which needs no dynamo; :class:`PlainSGD` keeps
the momentum buffers and calls it exactly as ``torch.optim.SGD.step`` does
(``tests/client/test_client_imports.py`` checks the two give the same parameters).
Opacus' grad-sample modes still use ``torch.optim.SGD``, which Opacus wraps.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.sgd import sgd


class PlainSGD:
    """``torch.optim.SGD(params, lr, momentum)`` (no dampening, decay or Nesterov)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, momentum: float):
        if lr < 0.0 or momentum < 0.0:
            raise ValueError(f"invalid SGD settings: lr {lr}, momentum {momentum}")
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        self.lr = lr
        self.momentum = momentum
        self._buffers: dict[int, torch.Tensor | None] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget every gradient (``set_to_none``) or zero it in place."""
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient, as torch's SGD does."""
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        buffers = [self._buffers.get(id(p)) for p in params] if self.momentum else []
        sgd(
            params,
            grads,  # type: ignore[arg-type]  # filtered to non-None above
            buffers,
            weight_decay=0.0,
            momentum=self.momentum,
            lr=self.lr,
            dampening=0.0,
            nesterov=False,
            maximize=False,
            has_sparse_grad=False,
            foreach=None,
            fused=None,
        )
        if self.momentum:
            for p, buffer in zip(params, buffers, strict=True):
                self._buffers[id(p)] = buffer
