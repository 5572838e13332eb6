"""Predict with an exported model on a device: needs only torch and numpy.

    python -m client.predict RESULTS/model.ts images.npz         # arrays 'x' (and 'y')
    python -m client.predict RESULTS/model-int8.ts images.csv    # pixels (+ 'label')
    python -m client.predict RESULTS/model.ts texts.csv          # 'text' (+ 'label')

A text model (``model.json`` has ``tokenizer``) reads raw text from a CSV with a
``text`` column, and an optional ``label`` column of class names or indices; it
tokenises with the exported ``tokenizer.json`` beside the model, which needs the
``tokenizers`` package (:mod:`client.predict_text`). An ``.npz`` gives it token ids.

Any exported variant (``model.ts`` float32, ``model-int8.ts``,
``model-int8-pruned.ts``) runs with the same command and output. Reads
``model.json`` beside the model for the input shape, classes, preprocessing (an
image normalisation, a per-feature affine map, or a function ``module:function``
that must be importable here) and the variant the file is. Prints
``index,class,name,probability`` per example; on stderr the variant loaded, and
the accuracy when labels are present. Does not import the training code.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

_CHUNK = 256  # examples per forward call


def _read_input(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return data["x"], (data["y"] if "y" in data else None)
    with open(path, encoding="utf-8") as fh:
        header = fh.readline().strip().split(",")
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    if "label" in header:
        col = header.index("label")
        return np.delete(table, col, axis=1), table[:, col]
    return table, None


def model_variant(meta: dict[str, Any], model_path: Path) -> tuple[str, dict[str, Any]]:
    """The variant name and ``model.json`` entry of the file ``model_path``.

    A ``model.json`` written before compressed variants existed has no
    ``variants``; it describes ``model.ts`` (float32) and nothing else.
    """
    variants = meta.get("variants", {"float32": {"file": "model.ts"}})
    for name, entry in variants.items():
        if entry["file"] == model_path.name:
            return name, entry
    listed = ", ".join(entry["file"] for entry in variants.values())
    raise ValueError(
        f"{model_path.with_name('model.json')} describes no model file "
        f"{model_path.name!r}; it describes: {listed}"
    )


def model_input(meta: dict[str, Any], raw: np.ndarray) -> np.ndarray:
    """Raw records to the model's float32 input, as ``model.json`` describes.

    Written without privfed's code (a device has only torch and numpy): the same
    arithmetic as :mod:`common.tasks.preprocessing`. A ``model.json`` from before
    tasks had a preprocessing description holds ``normalisation`` (pixels) instead.
    """
    if "tokenizer" in meta:  # token ids: the text task's function is just float32
        length = int(meta["tokenizer"]["max_length"])
        return np.asarray(raw, dtype=np.float32).reshape(-1, length)
    prep = meta.get("preprocessing") or {"kind": "image", **meta["normalisation"]}
    kind = prep["kind"]
    if kind == "callable":  # the task's own function: its module must be installed here
        import importlib

        module, _, name = prep["function"].partition(":")
        function = getattr(importlib.import_module(module), name)
        x = np.asarray(raw).reshape(-1, *prep["raw_shape"])
        return np.asarray(function(x), dtype=np.float32)
    x = np.asarray(raw, dtype=np.float32).reshape(-1, *meta["input_shape"])
    if kind == "image":  # common/tasks/preprocessing.py: ImagePreprocessing
        return (x / prep["pixel_scale"] - prep["mean"]) / prep["std"]
    if kind == "affine":  # AffinePreprocessing, per feature of the last axis
        offset = np.asarray(prep["offset"], dtype=np.float32)
        return (x - offset) / np.asarray(prep["scale"], dtype=np.float32)
    raise ValueError(f"model.json: unknown preprocessing kind {kind!r}")


def read_records(
    meta: dict[str, Any], model_path: Path, input_path: Path
) -> tuple[np.ndarray, np.ndarray | None]:
    """The model's float32 input and the labels (if any) of ``input_path``."""
    if "tokenizer" in meta and input_path.suffix == ".csv":  # raw text
        from client.predict_text import read_text_csv, text_input

        texts, labels = read_text_csv(input_path, meta["classes"])
        return text_input(model_path, meta["tokenizer"], texts), labels
    x, labels = _read_input(input_path)
    return model_input(meta, x), labels


def predict(
    model_path: Path, input_path: Path
) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """Class indices, probabilities, class names and the variant loaded."""
    classes, probs, names, variant, _ = _predict(model_path, input_path)
    return classes, probs, names, variant


def _predict(
    model_path: Path, input_path: Path
) -> tuple[np.ndarray, np.ndarray, list[str], str, np.ndarray | None]:
    meta = json.loads(model_path.with_name("model.json").read_text())
    variant, _ = model_variant(meta, model_path)
    x, labels = read_records(meta, model_path, input_path)
    with warnings.catch_warnings():
        # TorchScript and quantised tensors are deprecated in torch 2.13; the
        # notices are for model authors, not for a device running a model.
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        if variant != "float32":
            _spend_quantised_tensor_notice()
        model = torch.jit.load(str(model_path), map_location="cpu")
        model.eval()
        with torch.no_grad():  # in chunks: a transformer's attention grows with N
            chunks = torch.from_numpy(x).split(_CHUNK)
            probs = torch.cat([torch.softmax(model(c), dim=1) for c in chunks]).numpy()
    return probs.argmax(axis=1), probs.max(axis=1), meta["classes"], variant, labels


def _spend_quantised_tensor_notice() -> None:
    """Trigger torch's once-per-process quantised-tensor notice where Python filters it.

    Loading an int8 file creates quantised tensors inside ``torch.jit.load``, whose
    C++ notice bypasses Python's warning filters and would print on every run.
    """
    torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.qint8)


def main(argv: list[str] | None = None) -> int:
    """Print predictions; exit 1 on unreadable input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model", type=Path, help="model.ts or a compressed variant (model.json beside it)"
    )
    parser.add_argument(
        "input", type=Path, help=".npz with 'x', .csv of pixels, or .csv of 'text'"
    )
    args = parser.parse_args(argv)
    try:
        classes, probs, names, variant, labels = _predict(args.model, args.input)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"# model {variant} ({args.model.name})", file=sys.stderr)
    print("index,class,name,probability")
    for i, (c, p) in enumerate(zip(classes, probs, strict=True)):
        print(f"{i},{c},{names[c]},{p:.4f}")
    if labels is not None:
        accuracy = float((classes == np.asarray(labels).astype(int)).mean())
        print(
            f"# accuracy {accuracy:.4f} on {len(classes)} labelled examples",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
