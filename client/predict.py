"""Predict with an exported model on a device: needs only torch and numpy.

    python -m client.predict RESULTS/model.ts images.npz     # arrays 'x' (and 'y')
    python -m client.predict RESULTS/model.ts images.csv     # pixel columns (+ 'label')

Reads ``model.json`` beside the model for the input shape, classes and
normalisation. Prints ``index,class,name,probability`` per example, and the
accuracy when labels are present. Does not import the training code.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch


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


def predict(model_path: Path, input_path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Class indices and probabilities for every example in ``input_path``."""
    meta = json.loads(model_path.with_name("model.json").read_text())
    norm = meta["normalisation"]
    x, _ = _read_input(input_path)
    x = np.asarray(x, dtype=np.float32).reshape(-1, *meta["input_shape"])
    x = (x / norm["pixel_scale"] - norm["mean"]) / norm["std"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(str(model_path), map_location="cpu")
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    return probs.argmax(axis=1), probs.max(axis=1), meta["classes"]


def main(argv: list[str] | None = None) -> int:
    """Print predictions; exit 1 on unreadable input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="model.ts (model.json beside it)")
    parser.add_argument("input", type=Path, help=".npz with 'x' or .csv of pixels")
    args = parser.parse_args(argv)
    try:
        classes, probs, names = predict(args.model, args.input)
        _, labels = _read_input(args.input)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
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
