"""Export the global model for on-device inference: TorchScript plus metadata."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from common.atomic_files import atomic_write_bytes
from common.config import RunConfig
from common.datasets import IMAGE_SIDE, normalisation
from common.features import ScatteringFront
from common.models import build_model

CLASS_NAMES = {
    "digits": [str(i) for i in range(10)],
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
}  # fmt: skip


def _to_torchscript(model: torch.nn.Module, cfg: RunConfig) -> torch.jit.ScriptModule:
    """Script the model; a feature map is traced in front, so it takes raw images."""
    if cfg.features == "pixels":
        return torch.jit.script(model)
    side = IMAGE_SIDE[cfg.dataset]
    full = torch.nn.Sequential(ScatteringFront(side), model).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(full, torch.zeros(2, 1, side, side), check_trace=False)


def export_model(
    arrays: ArrayRecord, cfg: RunConfig, out_dir: Path, extra: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``model.ts`` (TorchScript) and ``model.json`` (what a predictor needs)."""
    model = build_model(cfg.dataset, features=cfg.features)
    model.load_state_dict(arrays.to_torch_state_dict())
    model.eval()
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is what
        # runs on CPU-only edge installs without the model's Python code.
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = _to_torchscript(model, cfg)
        ts_path = out_dir / "model.ts"
        tmp = out_dir / ".model.ts.tmp"
        scripted.save(str(tmp))
        tmp.replace(ts_path)
    scale, mean, std = normalisation(cfg.dataset)
    side = IMAGE_SIDE[cfg.dataset]
    meta = {
        "format": "privfed-torchscript/1",
        "dataset": cfg.dataset,
        "input_shape": [1, side, side],
        "classes": CLASS_NAMES[cfg.dataset],
        "normalisation": {"pixel_scale": scale, "mean": mean, "std": std},
        "features": cfg.features,  # a feature map is part of model.ts
        "note": "raw pixels x -> (x / pixel_scale - mean) / std, shape (N, 1, H, W)",
        **extra,
    }
    meta_path = out_dir / "model.json"
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    return ts_path, meta_path
