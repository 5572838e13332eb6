"""Compressed exports against float32: size, accuracy, latency, peak RSS of predict.

For each model (the digits MLP and the tanh CNN, briefly trained here without DP;
the ``fmnist-eps3`` preset model read from a finished run's ``model.pt``) the
server's own ``export_model`` writes every variant; the figures in ``model.json``
(bytes, accuracy on the full test set) are read back, and each file is then timed
in a fresh process on 1 CPU thread: one image, and a batch of 256, median of
repeats. Peak RSS is that of ``python -m client.predict FILE 256-images.npz``.

    python -m simulations.bench.export_compression \\
        --preset-run /tmp/bench/sweep-eps3/eps3-iid-seed0 --out /tmp/bench-compression
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from common.config import RunConfig
from common.data.datasets import load_dataset, normalisation
from common.data.features import ScatteringFront
from common.run_keys import EXPORT_COMPRESSIONS
from common.tasks.models import build_model
from server.export.compression import (
    VARIANT_FILES,
    ScriptedScattering,
    compress,
    quiet_quantisation_warnings,
)
from server.export.torchscript import export_model

REPO = Path(__file__).resolve().parents[2]
METHODS = tuple(m for m in EXPORT_COMPRESSIONS if m != "none")

# Runs in a fresh process: load every variant of one model, time them on 1 thread
# round-robin (so that drift in machine load hits all alike), print medians as JSON.
_TIMER = """
import json, statistics, sys, time, warnings
import numpy as np, torch
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*deprecated.*")
torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.qint8)  # spend the notice
x = torch.from_numpy(np.load(sys.argv[1])["x"])
repeats = {"single_ms": (x[:1], int(sys.argv[2])),
           "batch256_ms": (x[:256], int(sys.argv[3]))}
models = {path: torch.jit.load(path).eval() for path in sys.argv[4:]}
times = {path: {key: [] for key in repeats} for path in models}
with torch.no_grad():
    for key, (batch, count) in repeats.items():
        for model in models.values():
            for _ in range(3):
                model(batch)
        for _ in range(count):
            for path, model in models.items():
                start = time.perf_counter()
                model(batch)
                times[path][key].append(1e3 * (time.perf_counter() - start))
medians = {p: {k: statistics.median(v) for k, v in t.items()} for p, t in times.items()}
print(json.dumps(medians))
"""


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    """Brief non-private training, so that accuracy changes mean something."""
    generator = torch.Generator().manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(64):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimiser.step()
    model.eval()


def _models(
    args: argparse.Namespace,
) -> list[tuple[str, RunConfig, dict[str, torch.Tensor]]]:
    """(label, config, weights) for every benchmarked model."""
    out = []
    digits = load_dataset("digits", "", 42)
    mlp = build_model("digits", seed=0)
    _train(mlp, torch.from_numpy(digits.x_train), torch.from_numpy(digits.y_train), 30)
    out.append(("digits MLP", RunConfig(), mlp.state_dict()))
    fmnist = load_dataset("fashion-mnist", "", 42)
    cnn = build_model("fashion-mnist", seed=0)
    n = args.cnn_examples
    x, y = torch.from_numpy(fmnist.x_train[:n]), torch.from_numpy(fmnist.y_train[:n])
    _train(cnn, x, y, args.cnn_epochs)
    out.append(("tanh CNN", RunConfig(task="fashion-mnist"), cnn.state_dict()))
    if args.preset_run is not None:
        run_config = json.loads((args.preset_run / "config.json").read_text())["run_config"]
        cfg = RunConfig.from_run_config(
            {k: v for k, v in run_config.items() if k != "export-compression"}
        )
        weights = torch.load(args.preset_run / "model.pt", map_location="cpu")
        out.append(("fmnist-eps3", cfg, weights))
    return out


# Runs client.predict in a fresh process, then prints that process's own peak RSS.
# (ru_maxrss of a child is useless here: Linux carries the parent's peak into it.)
_PREDICT_THEN_PEAK = """
import runpy, sys
sys.argv = ["predict", *sys.argv[1:]]
try:
    runpy.run_module("client.predict", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    assert not exc.code, exc.code
peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print("# peak-rss-kib", peak.split()[1], file=sys.stderr)
"""


def _peak_rss_mib(model_file: Path, images: Path) -> float:
    """Peak RSS of ``python -m client.predict`` on ``images`` (a fresh process)."""
    proc = subprocess.run(
        [sys.executable, "-c", _PREDICT_THEN_PEAK, str(model_file), str(images)],
        cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"client.predict {model_file} failed: {proc.stderr}")
    if "deprecated" in proc.stderr:
        raise RuntimeError(f"client.predict {model_file} printed a deprecation notice")
    peak = [line for line in proc.stderr.splitlines() if line.startswith("# peak-rss-kib")]
    return int(peak[0].split()[-1]) / 1024


def _time(
    files: list[Path], normalised: Path, single: int, batch: int
) -> dict[str, dict[str, float]]:
    """Median single-image and batch-256 milliseconds per file, timed side by side."""
    proc = subprocess.run(
        [sys.executable, "-c", _TIMER, str(normalised), str(single), str(batch),
         *map(str, files)],
        cwd=REPO, capture_output=True, text=True, check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    return json.loads(proc.stdout)


def _inputs(cfg: RunConfig, folder: Path) -> tuple[Path, Path]:
    """256 test images: raw pixels for predict, and normalised for the timer."""
    data = load_dataset(cfg.task, cfg.data_dir, cfg.seed)
    x, y = data.x_test[:256], data.y_test[:256]
    scale, mean, std = normalisation(cfg.task)
    raw = np.rint((x * std + mean) * scale).clip(0, scale).astype(np.uint8)
    np.savez(folder / "raw256.npz", x=raw[:, 0], y=y)
    np.savez(folder / "normalised256.npz", x=x)
    return folder / "raw256.npz", folder / "normalised256.npz"


def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (model, variant)."""
    rows = []
    for label, cfg, weights in _models(args):
        folder = args.out / label.replace(" ", "-")
        folder.mkdir(parents=True, exist_ok=True)
        raw, normalised = _inputs(cfg, folder)
        variants: dict[str, dict[str, Any]] = {}
        for method in METHODS:
            (folder / method).mkdir(exist_ok=True)
            run_cfg = RunConfig(**{**cfg.__dict__, "export_compression": method})
            start = time.perf_counter()
            export_model(ArrayRecord(weights), run_cfg, folder / method, {})
            print(
                f"[bench] {label} {method}: exported in {time.perf_counter() - start:.1f} s"
            )
            meta = json.loads((folder / method / "model.json").read_text())
            variants.setdefault("float32", meta["variants"]["float32"])
            variants[method] = meta["variants"][method]
        files = {
            name: folder / ("int8" if name == "float32" else name) / VARIANT_FILES[name]
            for name in variants
        }
        timings = _time(
            list(files.values()), normalised, args.single_repeats, args.batch_repeats
        )
        for name, entry in variants.items():
            rows.append(
                {
                    "model": label,
                    "variant": name,
                    **entry,
                    **timings[str(files[name])],
                    "predict_peak_rss_mib": _peak_rss_mib(files[name], raw),
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The side-by-side table."""
    lines = [
        "| model | variant | file bytes | gzip bytes | smaller | weight sparsity "
        "| test accuracy | Δ points | 1 image ms | batch 256 ms | predict peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['bytes']:,} | {r['gzip_bytes']:,} "
            f"| {r.get('size_factor', 1.0):.2f}x | {r['weight_sparsity']:.1%} "
            f"| {r['accuracy']:.4f} | {r.get('accuracy_change_points', 0.0):+.2f} "
            f"| {r['single_ms']:.3f} | {r['batch256_ms']:.2f} "
            f"| {r['predict_peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def zip_breakdown(data: bytes) -> dict[str, int]:
    """Bytes a TorchScript archive spends on tensors, code and debug records."""
    parts: collections.Counter[str] = collections.Counter()
    for info in zipfile.ZipFile(io.BytesIO(data)).infolist():
        name = info.filename.split("/", 1)[1]
        if name.endswith(".debug_pkl"):
            parts["debug records"] += info.compress_size
        elif name.startswith("code/"):
            parts["code"] += info.compress_size
        elif name.startswith(("data/", "constants/")):
            parts["tensors (" + name.split("/")[0] + ")"] += info.compress_size
        else:
            parts["other"] += info.compress_size
    return dict(parts)


def scattering_breakdown(weights: dict[str, torch.Tensor]) -> str:
    """Where the preset's bytes go, for the front as traced and as scripted."""
    model = build_model("fashion-mnist", features="scattering")
    model.load_state_dict(weights)
    model.eval()
    front = ScatteringFront(28)
    int8 = compress(model, "int8")
    candidates = {
        "model.ts: kymatio traced, float32 weights": (front, model, None),
        "kymatio traced, int8 weights": (front, int8, None),
        "scripted front, float32 filters, float32 weights": (front, model, torch.float32),
        "scripted front, float32 filters, int8 weights": (front, int8, torch.float32),
        "model-int8.ts: scripted front, float16 filters, int8 weights": (
            front, int8, torch.float16),
    }  # fmt: skip
    lines = ["| preset file | bytes | parts (bytes) |", "|---|---:|---|"]
    for label, (kymatio, head, filters) in candidates.items():
        with torch.no_grad(), quiet_quantisation_warnings(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            if filters is None:
                full = torch.jit.trace(
                    torch.nn.Sequential(kymatio, head), torch.zeros(2, 1, 28, 28),
                    check_trace=False,
                )  # fmt: skip
            else:
                full = torch.jit.script(
                    torch.nn.Sequential(ScriptedScattering(kymatio, filters), head)
                )
            buffer = io.BytesIO()
            torch.jit.save(full, buffer)
        data = buffer.getvalue()
        parts = ", ".join(f"{k} {v:,}" for k, v in sorted(zip_breakdown(data).items()))
        lines.append(f"| {label} | {len(data):,} | {parts} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Export, measure, print the table; write ``bench.json`` into ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset-run",
        type=Path,
        default=None,
        help="a finished fmnist-eps3 run folder (config.json, model.pt)",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cnn-examples", type=int, default=20_000)
    p.add_argument("--cnn-epochs", type=int, default=2)
    p.add_argument("--single-repeats", type=int, default=200)
    p.add_argument("--batch-repeats", type=int, default=50)
    args = p.parse_args(argv)  # fmt: skip
    torch.set_num_threads(1)
    rows = bench(args)
    (args.out / "bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))
    if args.preset_run is not None:
        print()
        print(scattering_breakdown(torch.load(args.preset_run / "model.pt")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
