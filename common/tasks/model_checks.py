"""Whether a task's model can be trained the way a run asks, checked before round 1.

A model a gradient path cannot handle would otherwise fail inside every client's
first round (or, worse, train without the guarantee: BatchNorm mixes the examples
of a batch, so per-sample clipping bounds nothing). The launchers and the
ServerApp call :func:`check_task_model` before anything trains; the client's
``direct`` path (client/training/per_sample_grads.py) asks
:func:`direct_mode_problem` too, so both refuse with the same words.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from common.config import RunConfig


def _layer_problem(name: str, module: nn.Module) -> str | None:
    from torch import nn

    trainable = any(p.requires_grad for p in module.parameters(recurse=False))
    if isinstance(module, nn.Conv2d) and trainable:
        if module.groups != 1 or module.padding_mode != "zeros":
            return (
                f"grad-sample-mode 'direct': layer {name!r} ({module}) must have "
                "groups=1 and padding_mode='zeros'; use grad-sample-mode 'hooks'"
            )
        if isinstance(module.padding, str):
            return (
                f"grad-sample-mode 'direct': layer {name!r} uses padding="
                f"{module.padding!r}; give integer padding or use 'hooks'"
            )
        return None
    if isinstance(module, (nn.Conv2d, nn.Linear)) or not trainable:
        return None
    return (
        f"grad-sample-mode 'direct' supports trainable Conv2d and Linear layers "
        f"only; layer {name!r} is {type(module).__name__}; use 'hooks', 'ew' "
        "or 'functorch'"
    )


def direct_mode_problem(model: nn.Module) -> str | None:
    """Why the ``direct`` per-sample path cannot train ``model``; ``None`` if it can."""
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm

    mixing = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    buffers = [n for n, _ in model.named_buffers()]
    if mixing or buffers:
        return (
            f"grad-sample-mode 'direct': {(mixing or buffers)[0]!r} is refused: "
            "BatchNorm mixes the examples of a batch (clipping then bounds "
            "nothing), and buffers such as running statistics would reach the "
            "server without noise"
        )
    layers = []
    for name, module in model.named_modules():
        problem = _layer_problem(name or "<root>", module)
        if problem:
            return problem
        if isinstance(module, (nn.Conv2d, nn.Linear)) and any(
            p.requires_grad for p in module.parameters()
        ):
            layers.append(module)
    if not layers:
        return "grad-sample-mode 'direct': no trainable layer"
    covered = [
        p for m in layers for p in (m.weight, m.bias) if p is not None and p.requires_grad
    ]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if len({id(p) for p in covered}) != len(covered) or {id(p) for p in covered} != {
        id(p) for p in trainable
    }:
        return (
            "grad-sample-mode 'direct': every trainable parameter must be the "
            "weight or bias of exactly one Conv2d/Linear layer (no shared, "
            "reparametrised or extra parameters); use 'hooks'"
        )
    return None


def private_model_problem(model: nn.Module, grad_sample_mode: str | None) -> str | None:
    """Why ``model`` cannot be trained privately (``grad_sample_mode`` for DP-SGD,
    ``None`` for client-level DP); ``None`` if it can."""
    sent = set(model.state_dict())  # a frozen encoder's buffers stay on each node
    buffers = [n for n, _ in model.named_buffers() if n in sent]
    if buffers:  # BatchNorm's running statistics, say: sent without noise
        return (
            f"buffer {buffers[0]!r} is refused under DP: buffers (such as BatchNorm's "
            "running statistics) would reach the server without noise; use GroupNorm "
            "or LayerNorm"
        )
    if grad_sample_mode is None:
        return None
    if grad_sample_mode == "direct":
        return direct_mode_problem(model)
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        return f"Opacus cannot train it with grad-sample-mode {grad_sample_mode!r}: " + (
            "; ".join(str(e) for e in errors[:3])
        )
    return None


def check_task_model(cfg: RunConfig) -> None:
    """Refuse (``ConfigError``) a run whose task's model its privacy mode cannot train.

    Builds the model once (torch), so callers are the launchers and the ServerApp,
    not config parsing.
    """
    from common.tasks.models import build_run_model

    if cfg.privacy_unit is None:
        return
    model = build_run_model(cfg)
    problem = private_model_problem(model, cfg.grad_sample_mode if cfg.is_private else None)
    if problem:
        raise ConfigError(
            f"run config keys 'task' and 'grad-sample-mode': the model of task "
            f"{cfg.task!r} cannot be trained with privacy-mode "
            f"{cfg.privacy_mode!r}: {problem}"
        )
