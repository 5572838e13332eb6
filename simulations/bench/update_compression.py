"""Compressed updates (``update-compression``) measured: bytes up per client per round,
the codec's error on real DP updates, and accuracy of a preset with and without.

    python -m simulations.bench.update_compression bytes
    python -m simulations.bench.update_compression accuracy --preset fmnist-eps3 \\
        --encodings none int4 int2 --out /tmp/bench-update-compression

``bytes`` runs the real ClientApp in process, one private round per model (digits MLP,
Fashion-MNIST tanh CNN, Fashion-MNIST ScatterNet + linear), once per encoding, with
the noise replayable (``reproducible-noise``) so that every encoding compresses the
very same DP-noised weights: Flower's serialised content bytes of each reply (report
included; exact, whatever the load) against the float32 reply, and the relative L2
error of the change the server decodes. ``accuracy`` runs the preset once per
encoding with ``simulations.run``, one after the other (never in parallel), and
compares final accuracy, ε and the bytes ``rounds.jsonl`` records.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MODELS = {  # name -> label, run-config fields, and the partitioning of the one client
    "digits": ("digits MLP", {"task": "digits"}, 10),
    "cnn": ("Fashion-MNIST tanh CNN", {"task": "fashion-mnist"}, 60),
    "scattering": (
        "Fashion-MNIST ScatterNet + linear (fmnist-eps3)",
        {
            "task": "fashion-mnist",
            "features": "scattering",
            "max_grad_norm": 0.1,
            "learning_rate": 4.0,
            "batch_size": 128,
            "target_epsilon": 3.0,
        },
        60,
    ),
}


# -- bytes ------------------------------------------------------------------------------
def _reply(cfg: Any, partitions: int) -> tuple[Any, Any]:
    """One private round of the real ClientApp, its ledger and shard cache in a fresh
    temporary results folder: (the instruction's weights, the reply)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict

    import client.app as client_app
    from common.tasks.models import build_model
    from simulations.launch.in_process_federation import delivered

    initial = ArrayRecord(
        build_model(cfg.task, seed=cfg.seed, features=cfg.features).state_dict()
    )
    content = RecordDict({"arrays": initial, "config": ConfigRecord({"server-round": 1})})
    context = Context(
        run_id=1, node_id=5, node_config={"partition-id": 3, "num-partitions": partitions},
        state=RecordDict(), run_config=cfg.to_run_config(),
    )  # fmt: skip
    reply = client_app.train(delivered(content, MessageType.TRAIN, 5), context)
    return initial, reply


def bytes_rows(models: list[str]) -> list[dict[str, Any]]:
    """One row per (model, encoding)."""
    import numpy as np

    from common.config import RunConfig
    from common.run_keys import UPDATE_COMPRESSIONS
    from common.wire.reply_fields import COMPRESSED_CHANGE_KEY
    from common.wire.update_codec import UpdateCodec
    from server.messaging import content_bytes

    rows = []
    for label, fields, partitions in (MODELS[m] for m in models):
        plain: dict[str, Any] = {}
        for name in UPDATE_COMPRESSIONS:
            started = time.process_time()
            with tempfile.TemporaryDirectory(prefix="privfed-bench-") as results:
                cfg = RunConfig(
                    **{"num_rounds": 2, "reproducible_noise": True, **fields},
                    update_compression=name, results_dir=results,
                )  # fmt: skip
                initial, reply = _reply(cfg, partitions)
            reference = initial.to_numpy_ndarrays()
            if name == "none":
                weights = reply.content["arrays"].to_numpy_ndarrays()
                plain = {
                    "bytes": content_bytes(reply.content),
                    "change": [
                        w.astype(np.float64) - r
                        for w, r in zip(weights, reference, strict=True)
                    ],
                }
                error = 0.0
            else:
                decoded = UpdateCodec(name).decode(
                    reply.content[COMPRESSED_CHANGE_KEY], reference
                )
                change = plain["change"]
                diff = sum(
                    float(np.sum((d - c) ** 2))
                    for d, c in zip(decoded.arrays, change, strict=True)
                )
                error = math.sqrt(diff / sum(float(np.sum(c**2)) for c in change))
            size = content_bytes(reply.content)
            rows.append(
                {
                    "model": label,
                    "parameters": int(sum(r.size for r in reference)),
                    "encoding": name,
                    "bytes_up": size,
                    "fraction_of_float32": size / plain["bytes"],
                    "relative_error": error,
                    "round_cpu_seconds": time.process_time() - started,
                }
            )
            print(f"[bench] {label} {name}: {size:,} bytes", file=sys.stderr)
    return rows


def bytes_markdown(rows: list[dict[str, Any]]) -> str:
    """The bytes table."""
    lines = [
        "| model (parameters) | encoding | bytes up per client per round | of float32 "
        "| ‖decoded − sent change‖ / ‖change‖ |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['parameters']:,}) | {r['encoding']} | {r['bytes_up']:,} "
            f"| {r['fraction_of_float32']:.3f} | {r['relative_error']:.4f} |"
        )
    return "\n".join(lines)


# -- accuracy ---------------------------------------------------------------------------
def _load() -> float:
    """The 1-minute load average (the machine is shared: say how busy it was)."""
    return os.getloadavg()[0]


def run_preset(preset: str, encoding: str, out: Path, timeout: float) -> dict[str, Any]:
    """One run of the preset with ``update-compression = encoding``; its figures."""
    folder = out / f"{preset}-{encoding}"
    load_before = _load()
    started = time.monotonic()
    command = [
        sys.executable, "-m", "simulations.run", "--preset", preset,
        "--set", f'update-compression="{encoding}"', "--results-dir", str(folder),
        "--timeout", str(timeout),
    ]  # fmt: skip
    print(f"[bench] {' '.join(command[1:])}", file=sys.stderr)
    subprocess.run(command, cwd=REPO, check=True)
    return figures(folder, encoding, load_before, time.monotonic() - started)


def figures(
    folder: Path, encoding: str, load: float | None = None, wall: float | None = None
) -> dict[str, Any]:
    """What a finished run folder says: final accuracy, ε, bytes per client per round."""
    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").open()]
    summary = json.loads((folder / "summary.json").read_text())
    sizes = summary["message_bytes"]
    return {
        "run": str(folder),
        "encoding": encoding,
        "status": summary["status"],
        "accuracy": rounds[-1]["central"]["accuracy"],
        "max_epsilon": summary["max_epsilon"],
        "accountant": summary["accountant"],
        "delta": summary["delta"],
        "bytes_up_per_client_per_round_median": sizes["up_per_client_per_round_median"],
        "bytes_down_per_client_per_round_median": sizes["down_per_client_per_round_median"],
        "up_median_per_round": [
            r["message_bytes"]["train"]["up_per_client_median"] for r in rounds
        ],
        "wall_seconds": wall if wall is not None else summary["wall_seconds"],
        "load_1min_before": load,
    }


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def accuracy_markdown(rows: list[dict[str, Any]]) -> str:
    """Side by side, against the first row (``none``)."""
    base = rows[0]
    lines = [
        "| update-compression | final accuracy | Δ points | max ε | bytes up per client "
        "per round (median) | of float32 | bytes down | wall s | load before |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        up = r["bytes_up_per_client_per_round_median"]
        lines.append(
            f"| {r['encoding']} | {100 * r['accuracy']:.2f} % "
            f"| {100 * (r['accuracy'] - base['accuracy']):+.2f} "
            f"| {r['max_epsilon']:.3f} ({r['accountant']}, δ={r['delta']:g}) "
            f"| {up:,.0f} | {up / base['bytes_up_per_client_per_round_median']:.3f} "
            f"| {r['bytes_down_per_client_per_round_median']:,.0f} "
            f"| {r['wall_seconds']:.0f} | {_cell(r['load_1min_before'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``bytes`` or ``accuracy``; prints Markdown, writes JSON beside it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bytes", help="bytes and codec error per model, in process")
    b.add_argument("--json", type=Path, default=None, help="also write the rows here")
    b.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    a = sub.add_parser("accuracy", help="the preset once per encoding, sequentially")
    a.add_argument("--preset", default="fmnist-eps3")
    a.add_argument("--encodings", nargs="+", default=["none", "int4"])
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    a.add_argument(
        "--existing", action="store_true",
        help="read finished run folders in --out instead of running the preset",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.command == "bytes":
        rows = bytes_rows(args.models)
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(bytes_markdown(rows))
        return 0
    if args.encodings[0] != "none":
        p.error("--encodings: the first is the baseline and must be 'none'")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [
        figures(args.out / f"{args.preset}-{name}", name)
        if args.existing
        else run_preset(args.preset, name, args.out, args.timeout)
        for name in args.encodings
    ]
    (args.out / "bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(accuracy_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
