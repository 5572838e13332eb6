"""Federated DP fine-tuning of MiniLM on Pang & Lee's sentences: the frontier table.

Arms (task ``sentiment``, IID over ``--clients`` clients, the server's held-out
fifth scores every arm):

- ``probe``: the frozen encoder and a linear head (``lora-rank = 0``), non-private;
- ``probe-dp8``: the same under sample-level DP-SGD at per-client ε ≤ 8;
- ``lora``: LoRA adapters (``lora-rank``/``lora-target-modules``) and the head,
  non-private;
- ``lora-dp1``, ``lora-dp3``, ``lora-dp8``: the same at per-client ε ≤ 1, 3, 8.

Each arm is a whole privfed run, the ServerApp's ``main`` over real ClientApps
(``simulations/launch/in_process_federation.py``: one process, no SuperLink, so
the table measures training rather than Ray on a 2-core host). The run's own
``summary.json`` gives the accuracy, ε (δ = 1e-5, RDP), bytes per round and wall
time; the trainable parameter count is the model's state, which is all that
travels (update compression off, so bytes are float32 adapters).

    python -m simulations.bench.text_lora --arms lora-dp8 --out /tmp/text-bench
    python -m simulations.bench.text_lora --arms all --out /tmp/text-bench
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.config import RunConfig
from common.tasks.models import build_run_model, count_parameters
from simulations.presets import PRESETS

# Every arm is preset sentiment-lora-eps8 (simulations/presets.py) but for its changes.
BASE: dict[str, Any] = {
    **PRESETS["sentiment-lora-eps8"].run_config,
    "export-compression": "none",  # the export is timed on its own (docs/text.md)
}
_PRIVATE = {"privacy-mode": "sample", "noise-multiplier": 0.0}
_PLAIN = {"privacy-mode": "none", "target-epsilon": 0.0}
ARMS: dict[str, dict[str, Any]] = {
    "probe": {**_PLAIN, "lora-rank": 0},
    "probe-dp8": {**_PRIVATE, "lora-rank": 0, "target-epsilon": 8.0},
    "lora": dict(_PLAIN),
    "lora-dp1": {**_PRIVATE, "target-epsilon": 1.0},
    "lora-dp3": {**_PRIVATE, "target-epsilon": 3.0},
    "lora-dp8": {**_PRIVATE, "target-epsilon": 8.0},
}


def _server_context(cfg: RunConfig) -> Context:
    return Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(),
        run_config=cfg.to_run_config(),
    )  # fmt: skip


def run_arm(name: str, clients: int, out: Path, threads: int, **extra: Any) -> dict:
    """One arm as a whole in-process privfed run; its row of the table."""
    import server.app as server_app
    from simulations.launch.in_process_federation import InProcessGrid, federation

    for key, value in {"_run_id": 1, "_node_id": 1, "_task_id": 1}.items():
        setattr(TaskIdentity, key, value)  # what a ServerApp process holds
    values = {**BASE, **ARMS[name], **extra, "torch-threads": threads}
    values.update(min_nodes(clients), **{"results-dir": str(out / name)})
    cfg = RunConfig.from_run_config(values)
    started = time.perf_counter()
    grid = InProcessGrid(federation(cfg, range(clients), clients))
    server_app.main(grid, _server_context(cfg))  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    summary = json.loads((out / name / "summary.json").read_text())
    model = build_run_model(cfg)
    sent = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    bytes_ = summary.get("message_bytes") or {}
    return {
        "arm": name,
        "status": summary["status"],
        "accuracy": summary["final_central"]["accuracy"],
        "max_epsilon": summary["max_epsilon"],
        "delta": cfg.delta if cfg.privacy_unit else None,
        "trainable_parameters": count_parameters(model),
        "update_bytes_float32": sent,
        "full_model_bytes_float32": full,
        "message_bytes": bytes_,
        "wall_seconds": round(seconds, 1),
        "run_config": {k: values[k] for k in sorted(values) if k != "results-dir"},
    }


def min_nodes(clients: int) -> dict[str, int]:
    """Every client trains every round."""
    return {"min-train-nodes": clients, "min-available-nodes": clients}


def table(rows: list[dict]) -> str:
    """The markdown table BENCHMARKS.md records."""
    lines = [
        "| arm | accuracy | ε (δ 1e-5, RDP) | trainable parameters | adapter bytes "
        "(float32) | message bytes per client per round, up / down | full model "
        "bytes | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "∞ (non-private)" if r["max_epsilon"] is None else f"{r['max_epsilon']:.2f}"
        sent = r["message_bytes"]
        up, down = (sent.get(f"{d}_per_client_per_round_median") for d in ("up", "down"))
        lines.append(
            f"| {r['arm']} | {100 * r['accuracy']:.1f} % | {eps} | "
            f"{r['trainable_parameters']:,} | {r['update_bytes_float32']:,} | "
            f"{up:,.0f} / {down:,.0f} | {r['full_model_bytes_float32']:,} | "
            f"{r['wall_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run the chosen arms; print the table and write ``results.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="all", help="comma-separated, or 'all'")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--rounds", type=int, default=None, help="override num-rounds")
    parser.add_argument("--out", type=Path, default=Path("results/bench-text-lora"))
    args = parser.parse_args()
    names = list(ARMS) if args.arms == "all" else args.arms.split(",")
    extra = {} if args.rounds is None else {"num-rounds": args.rounds}
    rows = []
    for name in names:
        rows.append(run_arm(name, args.clients, args.out, args.threads, **extra))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
