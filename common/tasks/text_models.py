"""A frozen pretrained encoder with LoRA adapters and a classification head.

Built by :class:`common.tasks.text.TextModel` from a checked local model
directory. The encoder is loaded without its pooler: the head mean-pools the
last hidden states itself, and a LoRA target the forward pass never uses (the
pooler's ``dense``) leaves Opacus without per-sample gradients for it ("Per
sample gradient is not initialized"). Adapters are injected with
``peft.inject_adapter_in_model`` into the encoder in place, on the CPU module as
built (opacus#820 saw silently corrupted LoRA updates when the model moved after
``get_peft_model``), so parameter names stay plain and Opacus' hooks see ordinary
``nn.Linear`` adapter layers. Dropout is off: it would make per-sample gradients
differ between passes, and DP noise regularises already.

Only trainable parameters (adapters, head) are the model's state
(:class:`~common.tasks.exchanged_state.TrainableState`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from common.errors import ConfigError
from common.tasks.exchanged_state import TrainableState

LORA_MARK = "lora_"  # peft's adapter parameter names contain it


@lru_cache(maxsize=2)
def _encoder(folder: Path) -> nn.Module:
    """The frozen encoder of ``folder`` (loaded once per process; callers copy it)."""
    import transformers
    from transformers import AutoModel

    transformers.logging.set_verbosity_error()  # the dropped pooler is expected
    transformers.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        encoder = AutoModel.from_pretrained(
            str(folder),
            local_files_only=True,
            add_pooling_layer=False,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    except Exception as exc:
        from common.data.checks import DataFileError

        raise DataFileError(
            folder / "model.safetensors", "model cannot be loaded",
            "a BERT-family encoder that transformers loads from local files",
            f"{type(exc).__name__}: {exc}",
        ) from exc  # fmt: skip
    encoder.eval()
    for param in encoder.parameters():
        param.requires_grad_(False)
    return encoder


class PooledClassifier(nn.Module):
    """Token ids ``(B, L)`` (float) -> logits: encoder, masked mean pool, linear head."""

    def __init__(self, encoder: nn.Module, head: nn.Linear, pad_id: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.pad_id = pad_id
        self.head = head

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's masked mean of its last hidden states, ``(B, hidden)``."""
        ids = x.long()
        mask = (ids != self.pad_id).long()
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``; ids equal to the pad id are masked out."""
        return self.head(self.pooled(x))


# A frozen encoder's pooled output per (encoder folder, token-id row): the head-only
# (linear probe) model computes each sentence's features once per process (the
# ScatterNet trick), as no gradient reaches the encoder. Bounded: rows beyond it
# are computed again.
_FEATURES: dict[tuple[str, bytes], torch.Tensor] = {}
_FEATURES_LIMIT = 200_000


class LoraTextClassifier(TrainableState, PooledClassifier):
    """The trained form: its state is the adapters and the head alone."""

    source = ""  # the encoder's folder: keys the frozen features (set by the builder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits; padding columns no row of the batch uses are cut first (exact:
        padded positions are masked out of attention and pooling), which saves
        most of the encoder's work on short sentences. With no adapters the
        encoder's features are computed once per sentence and reused."""
        if not any(p.requires_grad for p in self.encoder.parameters()):
            return self.head(self._frozen_features(x))
        return super().forward(_trimmed(x, self.pad_id))

    def _frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        keys = [(self.source, row.tobytes()) for row in x.detach().numpy()]
        missing = [i for i, key in enumerate(keys) if key not in _FEATURES]
        if missing:
            with torch.no_grad():
                fresh = self.pooled(_trimmed(x[missing], self.pad_id))
            for i, features in zip(missing, fresh, strict=True):
                if len(_FEATURES) < _FEATURES_LIMIT:
                    _FEATURES[keys[i]] = features
            if len(_FEATURES) >= _FEATURES_LIMIT:
                with torch.no_grad():
                    return self.pooled(_trimmed(x, self.pad_id))
        return torch.stack([_FEATURES[key] for key in keys])

    def export_module(self) -> nn.Module:
        """A plain copy with the adapters merged into the base weights (for export)."""
        from peft.tuners.lora import LoraLayer

        encoder = copy.deepcopy(self.encoder).eval()
        for name, module in list(encoder.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                parent, _, child = name.rpartition(".")
                setattr(encoder.get_submodule(parent), child, module.get_base_layer())
        merged = PooledClassifier(encoder, copy.deepcopy(self.head), self.pad_id)
        return merged.eval().requires_grad_(False)

    def example_input(self, length: int) -> torch.Tensor:
        """Two id rows for tracing, one padded (so the traced graph keeps the mask)."""
        ids = torch.full((2, length), float(self.pad_id))
        ids[:, 0] = 1.0 if self.pad_id != 1 else 2.0
        ids[0, 1:] = ids[0, 0]
        return ids


def _trimmed(x: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``x`` without the trailing columns that are padding in every row."""
    used = int((x != pad_id).sum(1).max()) if len(x) else 1
    return x[:, : max(used, 1)]


def _inject(encoder: nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> None:
    """LoRA adapters on the encoder's ``targets`` (each must name a Linear layer)."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [n for n, _ in encoder.named_modules()]
    for target in targets:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            raise ConfigError(
                f"run config key 'lora-target-modules': {target!r} matches no layer of "
                f"the encoder (its linear layers end in "
                f"{sorted({n.rsplit('.', 1)[-1] for n in names if _linear(encoder, n)})})"
            )
        wrong = [n for n in hits if not _linear(encoder, n)]
        if wrong:
            raise ConfigError(
                f"run config key 'lora-target-modules': {target!r} matches {wrong[0]!r}, "
                "which is not a Linear layer (adapters go on Linear layers only)"
            )
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
        target_modules=list(targets),
    )  # fmt: skip
    inject_adapter_in_model(config, encoder)
    for name, param in encoder.named_parameters():
        param.requires_grad_(LORA_MARK in name)


def _linear(encoder: nn.Module, name: str) -> bool:
    return isinstance(encoder.get_submodule(name), nn.Linear)


def lora_text_classifier(
    folder: Path, num_classes: int, rank: int, alpha: float, targets: Sequence[str]
) -> LoraTextClassifier:
    """A fresh classifier on ``folder``'s encoder; ``rank`` 0: the head alone trains."""
    encoder = copy.deepcopy(_encoder(Path(folder)))
    if rank > 0:
        _inject(encoder, rank, alpha, targets)
    pad_id = encoder.config.pad_token_id
    head = nn.Linear(int(encoder.config.hidden_size), num_classes)
    model = LoraTextClassifier(encoder, head, 0 if pad_id is None else int(pad_id))
    model.source = str(folder)
    return model
