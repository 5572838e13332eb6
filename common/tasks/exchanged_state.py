"""A model whose state, as sent and stored, is its trainable parameters alone.

A LoRA text model is a 22.7 M-parameter frozen encoder plus some 75 k trainable
adapter and head weights. The frozen part is identical in every process (it is
rebuilt from the same checked local files), so sending it would cost 90 MB a
message and reveal nothing new. :class:`TrainableState` makes ``state_dict`` and
``load_state_dict`` cover the trainable parameters only; everything that moves
models (the ClientApp's reply, the server's initial arrays, aggregation, central
evaluation, checkpoints, update compression, every privacy mode) goes through
those two methods, so the adapters alone travel without any of it knowing.

What is trainable must be decided when the model is built, before any state is
read or written: the keys of a model's state are its trainable parameters'
names at that time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class TrainableState(nn.Module):
    """``state_dict`` / ``load_state_dict`` over ``requires_grad`` parameters only."""

    def exchanged_keys(self, prefix: str = "") -> list[str]:
        """The names in this model's state: its trainable parameters, in order."""
        return [prefix + n for n, p in self.named_parameters() if p.requires_grad]

    def state_dict(  # type: ignore[override]
        self,
        *args: Any,
        destination: dict[str, Any] | None = None,
        prefix: str = "",
        keep_vars: bool = False,
    ) -> dict[str, Any]:
        """The trainable parameters (the frozen rest is rebuilt locally)."""
        full = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        out: dict[str, Any] = OrderedDict() if destination is None else destination
        for key in self.exchanged_keys(prefix):
            out[key] = full[key]
        return out

    def load_state_dict(  # type: ignore[override]
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load trainable parameters; with ``strict``, exactly those keys must come."""
        expected = set(self.exchanged_keys())
        given = set(state_dict)
        if strict and given != expected:
            missing = sorted(expected - given)[:3]
            unexpected = sorted(given - expected)[:3]
            raise RuntimeError(
                f"{type(self).__name__}: the state must hold exactly its "
                f"{len(expected)} trainable parameters (missing {missing}, "
                f"unexpected {unexpected})"
            )
        params = dict(self.named_parameters())
        with torch.no_grad():
            for key in given & expected:
                value = torch.as_tensor(state_dict[key])
                if value.shape != params[key].shape:
                    raise RuntimeError(
                        f"{type(self).__name__}: {key!r} has shape {tuple(value.shape)}, "
                        f"the model's is {tuple(params[key].shape)}"
                    )
                params[key].copy_(value)
        return nn.modules.module._IncompatibleKeys(
            sorted(expected - given), sorted(given - expected)
        )
