"""Per-sample clipped gradient sums for Conv2d/Linear models (grad-sample mode ``direct``).

DP-SGD needs, per step, Σᵢ clip(∇ℓᵢ) with clip(g) = g · min(1, C / (‖g‖ + 1e-6)),
the factor Opacus uses. Opacus gets there generically (a hook per layer, every
per-sample gradient kept, then clipped parameter by parameter); this module does
the same arithmetic specialised to the two layer types the project's models use:

- ``Linear`` on ``(B, in)`` inputs: ‖∇W ℓᵢ‖² = ‖gᵢ‖²‖aᵢ‖², so per-sample gradients
  are never formed; the clipped sum is one matrix product ``(f·g)ᵀ a``.
- ``Conv2d``: per-sample weight gradients come from one grouped convolution of the
  layer input with the output gradients (batch as groups, stride and dilation
  swapped), which is cheaper here than ``unfold`` + batched matmul.

Backpropagation stops at the layer outputs (``torch.autograd.grad``), so the
parameter gradients autograd would sum over the batch are never computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.tasks.model_checks import direct_mode_problem

CLIP_EPSILON = 1e-6  # Opacus' denominator guard in the clip factor


class UnsupportedModel(ValueError):
    """The model has a trainable layer the direct mode cannot differentiate per sample."""


@dataclass
class _Record:
    module: nn.Module
    activation: torch.Tensor
    output: torch.Tensor


class PerSampleClipper:
    """Records layer inputs and outputs in forward; returns clipped gradient sums."""

    def __init__(self, model: nn.Module) -> None:
        problem = direct_mode_problem(model)  # one home for what 'direct' can train
        if problem:
            raise UnsupportedModel(problem)
        self.layers: list[nn.Module] = [
            m
            for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
            and any(p.requires_grad for p in m.parameters())
        ]
        self._records: list[_Record] = []
        self._handles = [m.register_forward_hook(self._record) for m in self.layers]

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if any(r.module is module for r in self._records):
            raise UnsupportedModel(
                f"grad-sample-mode 'direct': layer {module} ran twice in one forward "
                "pass (shared weights); use 'hooks'"
            )
        self._records.append(_Record(module, inputs[0].detach(), output))

    def close(self) -> None:
        """Remove the forward hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clipped_sums(
        self, summed_loss: torch.Tensor, max_grad_norm: float
    ) -> dict[nn.Parameter, torch.Tensor]:
        """Σᵢ clip(∇ℓᵢ) per trainable parameter; ``summed_loss`` is Σᵢ ℓᵢ of the batch."""
        records, self._records = self._records, []
        if len(records) != len(self.layers):
            raise UnsupportedModel(
                "grad-sample-mode 'direct': not every trainable layer ran in forward"
            )
        grads = torch.autograd.grad(summed_loss, [r.output for r in records])
        parts = [
            _layer_part(r.module, r.activation, g)
            for r, g in zip(records, grads, strict=True)
        ]
        norms = torch.stack([sq for sq, _ in parts]).sum(0).sqrt()
        factor = (max_grad_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)
        sums: dict[nn.Parameter, torch.Tensor] = {}
        for _, summer in parts:
            sums.update(summer(factor))
        return sums


_Summer = Callable[[torch.Tensor], dict[nn.Parameter, torch.Tensor]]


def _layer_part(
    module: nn.Module, activation: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, _Summer]:
    """Per-sample squared norm of the layer's gradient, and its clipped summer."""
    if isinstance(module, nn.Linear):
        return _linear_part(module, activation, grad)
    assert isinstance(module, nn.Conv2d)
    return _conv_part(module, activation, grad)


def _linear_part(
    module: nn.Linear, a: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, _Summer]:
    weight, bias = module.weight, module.bias
    if a.dim() == 2:
        g_sq = g.pow(2).sum(1)
        sq = g_sq * a.pow(2).sum(1) if weight.requires_grad else torch.zeros_like(g_sq)
        if bias is not None and bias.requires_grad:
            sq = sq + g_sq

        def summer(f: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
            fg = g * f[:, None]
            out = {weight: fg.t() @ a} if weight.requires_grad else {}
            if bias is not None and bias.requires_grad:
                out[bias] = fg.sum(0)
            return out

        return sq, summer
    per_sample = {weight: torch.einsum("b...o,b...i->boi", g, a)}
    if bias is not None:
        per_sample[bias] = g.reshape(len(g), -1, g.shape[-1]).sum(1)
    return _materialised(per_sample)


def _conv_part(
    module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, _Summer]:
    batch, c_in = a.shape[0], a.shape[1]
    c_out, _, k_h, k_w = module.weight.shape
    pad_h, pad_w = module.padding  # type: ignore[misc]
    padded = F.pad(a, (pad_w, pad_w, pad_h, pad_h)) if pad_h or pad_w else a
    # Input channels become the batch, samples become groups: out[c, b·O+o, kh, kw]
    # = Σ_t g[b, o, t] · a[b, c, stride·t + dilation·k].
    weight_grads = F.conv2d(
        padded.transpose(0, 1),
        g.reshape(batch * c_out, 1, g.shape[2], g.shape[3]),
        stride=module.dilation,
        dilation=module.stride,
        groups=batch,
    )[:, :, :k_h, :k_w]
    # Kept in this (c_in, B, c_out·k_h·k_w) layout: no permuted copy is made.
    per_sample = weight_grads.reshape(c_in, batch, c_out * k_h * k_w)
    weight, bias = module.weight, module.bias
    sq = per_sample.square().sum((0, 2)) if weight.requires_grad else g.new_zeros(batch)
    bias_grads = g.sum((2, 3)) if bias is not None and bias.requires_grad else None
    if bias_grads is not None:
        sq = sq + bias_grads.square().sum(1)

    def summer(f: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        out = {}
        if weight.requires_grad:
            summed = torch.matmul(f, per_sample)  # (c_in, c_out·k_h·k_w)
            out[weight] = summed.reshape(c_in, c_out, k_h, k_w).transpose(0, 1)
        if bias_grads is not None:
            out[bias] = f @ bias_grads
        return out

    return sq, summer


def _materialised(
    per_sample: dict[nn.Parameter, torch.Tensor],
) -> tuple[torch.Tensor, _Summer]:
    trainable = {p: s for p, s in per_sample.items() if p.requires_grad}
    first = next(iter(per_sample.values()))
    sq = torch.zeros(first.shape[0], dtype=first.dtype, device=first.device)
    for s in trainable.values():
        sq = sq + s.reshape(len(s), -1).pow(2).sum(1)

    def summer(f: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        return {
            p: torch.tensordot(f, s, dims=1).reshape(p.shape) for p, s in trainable.items()
        }

    return sq, summer
