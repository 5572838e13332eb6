"""Measure a real deployment: peak RSS of a client round and bytes per round per client.

Starts a secure local deployment (SuperLink + N SuperNodes), runs the app, and
samples every 0.1 s the summed RSS of each SuperNode's process tree (the
SuperNode, its SuperExec and the ClientApp process of the round). Bytes per round
per client are the serialised Flower messages a client receives (train
instruction: global model + config) and sends (reply: update + metrics + ledger),
measured with Flower's own serialisation; TLS and HTTP framing are not included.

    python -m simulations.bench_deployment --clients 2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    RecordDict,
)
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from common.config import RunConfig
from common.models import build_model
from simulations.deployment import DeploymentSpec, LocalDeployment
from simulations.processes import (
    become_subreaper,
    descendants,
    process_tree,
    stop_processes,
)
from simulations.run_options import APP_DIR


def tree_rss(pid: int) -> int:
    """Summed resident memory of ``pid`` and its descendants, in bytes."""
    total = 0
    for proc in process_tree(pid):
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def message_bytes(dataset: str) -> dict[str, int]:
    """Serialised sizes of one round's train instruction and reply for one client.

    Flower sends a message as the tree of its objects (records, arrays, chunks);
    each size is the sum of those objects' serialised bytes.
    """
    import client.app as client_app  # the real ClientApp train function

    cfg = RunConfig(dataset=dataset, num_rounds=2)
    arrays = ArrayRecord(build_model(dataset, seed=0).state_dict())
    ctx = Context(
        run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(), run_config=cfg.to_run_config(),
    )  # fmt: skip
    metadata = Metadata(
        run_id=1, message_id="bench", src_node_id=0, dst_node_id=1,
        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600,
        message_type=MessageType.TRAIN,
    )  # fmt: skip
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    instruction = Message(content=content, metadata=metadata)
    reply = client_app.train(instruction, ctx)
    return {
        "down_bytes": _tree_bytes(instruction.content),
        "up_bytes": _tree_bytes(reply.content),
        "model_parameters": sum(a.numpy().size for a in arrays.values()),
    }


def _tree_bytes(content: RecordDict) -> int:
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print a Markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist"])
    args = p.parse_args(argv)
    become_subreaper()
    work = Path(tempfile.mkdtemp(prefix="privfed-bench-deploy-"))
    results = work / "results"
    peaks: dict[int, int] = {}
    stop = threading.Event()
    try:
        with LocalDeployment(DeploymentSpec(work / "dep", work / "certs")) as dep:
            dep.start_superlink()
            for i in range(args.clients):
                config = {
                    "partition-id": i, "num-partitions": args.clients,
                    "state-dir": str(work / f"node-{i}"),
                }  # fmt: skip
                dep.start_supernode(i, config, dep.node_key(i))
            idle = {i: tree_rss(h.process.pid) for i, h in dep.nodes.items()}

            def sample() -> None:
                while not stop.is_set():
                    for i, handle in dep.nodes.items():
                        peaks[i] = max(peaks.get(i, 0), tree_rss(handle.process.pid))
                    time.sleep(0.1)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            run_config = work / "run.toml"
            run_config.write_text(
                f'dataset = "{args.dataset}"\nnum-rounds = {args.rounds}\n'
                f"min-available-nodes = {args.clients}\nfraction-evaluate = 0.0\n"
                f"min-train-nodes = {min(2, args.clients)}\n"
                f'results-dir = "{results}"\n'
            )
            flwr_run = dep.run_app(run_config, APP_DIR)
            flwr_run.communicate(timeout=3600)
            stop.set()
            sampler.join()
    finally:
        stop.set()
        stop_processes(descendants())
    summary = json.loads((results / "summary.json").read_text())
    sizes = message_bytes(args.dataset)
    mib = 1024 * 1024
    print(f"dataset {args.dataset}, {args.clients} SuperNodes, {args.rounds} rounds, "
          f"status {summary['status']}")  # fmt: skip
    print("| measure | value |")
    print("|---|---|")
    print(f"| peak RSS per client (SuperNode + SuperExec + ClientApp), median of nodes | "
          f"{statistics.median(peaks.values()) / mib:.0f} MiB |")  # fmt: skip
    print(f"| peak RSS per client, max over nodes | {max(peaks.values()) / mib:.0f} MiB |")
    idle_mib = statistics.median(idle.values()) / mib
    print(f"| idle SuperNode tree RSS (median) | {idle_mib:.0f} MiB |")
    print(
        f"| bytes down per round per client (train instruction) | {sizes['down_bytes']:,} |"
    )
    print(f"| bytes up per round per client (reply) | {sizes['up_bytes']:,} |")
    print(f"| model parameters | {sizes['model_parameters']:,} |")
    return 0 if summary["status"] == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
