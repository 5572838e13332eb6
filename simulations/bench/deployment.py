"""Measure a real deployment: what one client message costs, per phase, and per round.

Starts a secure local deployment (SuperLink + N SuperNodes, each node with its
state folder and a privacy policy written from the run's settings, as
``simulations.deploy`` does), runs the app and measures:

- every ClientApp message from inside its own ``flwr-clientapp`` process
  (:mod:`simulations.bench.clientapp_probe`): CPU seconds per phase (interpreter, Flower's
  imports, pulling the task, FAB install, importing the app, data, features,
  training, the rest of the app, sending the reply), the CPU from process start to
  reply sent, and the process's peak RSS; a node's first message is shown apart
  from its later ones (which may reuse the node's cached shard);
- every 0.1 s, the summed RSS of each SuperNode's process tree (SuperNode +
  SuperExec + the ClientApp of the moment);
- the CPU of the SuperNode and SuperExec processes themselves (polling) and of
  the SuperLink side (SuperLink, nginx, SuperExec, ServerApp), and each round's
  wall seconds from ``rounds.jsonl``;
- bytes per round per client: the serialised Flower messages a client receives
  (train instruction) and sends (reply), with Flower's own serialisation; TLS and
  HTTP framing are not included.

CPU seconds are user + system and hold on a shared machine; wall seconds do not.

    python -m simulations.bench.deployment --clients 2 --rounds 3
    python -m simulations.bench.deployment --preset fmnist-eps3 --clients 2 \
        --num-partitions 10 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import tomli_w
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    RecordDict,
)

from common.config import RunConfig
from common.tasks.models import build_model
from common.tasks.registry import task_names
from server.messaging import content_bytes
from simulations.bench.clientapp_probe import PHASES, install_probe, read_messages
from simulations.deploy import write_node_policy
from simulations.deployment.deployment_spec import DeploymentSpec
from simulations.deployment.local import LocalDeployment
from simulations.launch.flower_env import flower_environment
from simulations.launch.options import APP_DIR, pyproject_defaults
from simulations.launch.preflight import partition_sizes
from simulations.launch.processes import (
    become_subreaper,
    descendants,
    process_tree,
    stop_processes,
    tree_rss,
)
from simulations.launch.superexec_wakeup import is_superexec
from simulations.presets import PRESETS

MIB = 1024 * 1024


def tree_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of SuperNode ``pid``'s own process and of its SuperExec.

    Its ClientApp processes (running, or finished and not yet reaped) are left out:
    the probe measures each of them from inside.
    """
    node = superexec = 0.0
    for proc in process_tree(pid):
        try:
            t = proc.cpu_times()
            if proc.pid == pid:
                node += t.user + t.system
            elif is_superexec(proc.cmdline(), proc.name()):
                superexec += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return node, superexec


def _nodes_cpu(dep: LocalDeployment) -> tuple[float, float]:
    """(SuperNodes' own CPU, SuperExecs' own CPU), summed over the nodes."""
    parts = [tree_cpu(h.process.pid) for h in dep.nodes.values()]
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def link_side_cpu(dep: LocalDeployment) -> float:
    """CPU seconds of the SuperLink, nginx and what they started (SuperExec,
    ServerApp), including children they reaped."""
    total = 0.0
    for root in (dep.superlink, dep.proxy):
        for proc in process_tree(root.pid) if root is not None else []:
            try:
                t = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += t.user + t.system + t.children_user + t.children_system
    return total


def message_bytes(dataset: str) -> dict[str, int]:
    """Serialised sizes of one round's train instruction and reply for one client.

    Flower sends a message as the tree of its objects (records, arrays, chunks);
    each size is the sum of those objects' serialised bytes.
    """
    import client.app as client_app  # the real ClientApp train function

    cfg = RunConfig(task=dataset, num_rounds=2)
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
        "down_bytes": content_bytes(instruction.content),
        "up_bytes": content_bytes(reply.content),
        "model_parameters": sum(a.numpy().size for a in arrays.values()),
    }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _cell(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.2f}{unit}"


def split_first(messages: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """A node's first message (it builds what it caches) and the later ones."""
    seen: set[Any] = set()
    first, later = [], []
    for record in messages:
        key = record.get("partition_id")
        (later if key in seen else first).append(record)
        seen.add(key)
    return first, later


def phase_rows(messages: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: median CPU seconds per phase, first vs later messages."""
    groups = split_first(messages)
    rows = [
        "| phase (CPU-s, median) | first message of a node | later messages |",
        "|---|---|---|",
    ]
    for key, label in PHASES:
        cells = [_median([m["cpu"].get(key, 0.0) for m in group]) for group in groups]
        rows.append(f"| {label} | {_cell(cells[0])} | {_cell(cells[1])} |")
    for key, label in (
        ("cpu_to_reply", "**process start to reply sent**"),
        ("cpu_total", "whole process (to exit)"),
    ):
        cells = [
            _median([m[key] for m in group if m.get(key) is not None]) for group in groups
        ]
        rows.append(f"| {label} | {_cell(cells[0])} | {_cell(cells[1])} |")
    peaks = [_median([m["peak_rss_bytes"] / MIB for m in group]) for group in groups]
    rows.append(
        f"| peak RSS of the ClientApp process (MiB) | {_cell(peaks[0])} | "
        f"{_cell(peaks[1])} |"
    )
    walls = [
        _median([m["wall_to_reply"] for m in group if m.get("wall_to_reply")])
        for group in groups
    ]
    rows.append(
        f"| wall s to reply sent (load-dependent) | {_cell(walls[0])} | {_cell(walls[1])} |"
    )
    counts = [len(group) for group in groups]
    rows.append(f"| messages measured | {counts[0]} | {counts[1]} |")
    return rows


def _run_config(args: argparse.Namespace, results: Path) -> dict[str, Any]:
    """What ``simulations.deploy`` would submit for these options."""
    overrides: dict[str, Any] = dict(PRESETS[args.preset].run_config) if args.preset else {}
    if args.dataset:
        overrides["task"] = args.dataset
    if args.data_dir:
        overrides["data-dir"] = args.data_dir
    overrides.update(
        {
            "num-rounds": args.rounds,
            "min-available-nodes": args.clients,
            "min-train-nodes": min(2, args.clients),
            "results-dir": str(results),
        }
    )
    return overrides


def run_bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Start the deployment, run the app, measure; every process stopped by PID."""
    results = work / "results"
    overrides = _run_config(args, results)
    cfg = RunConfig.from_run_config({**pyproject_defaults(), **overrides})
    partitions = args.num_partitions or args.clients
    probe_dir = work / "probe"
    peaks: dict[int, int] = {}
    stop = threading.Event()
    out: dict[str, Any] = {"cfg": cfg, "partitions": partitions}
    try:
        # cold: the probe is the flwr-clientapp each message starts (a warm template,
        # launch/warm_template.py, would fork Flower's own instead and bypass it)
        spec = DeploymentSpec(work / "dep", work / "certs", warm_clientapp=False)
        with LocalDeployment(spec) as dep:
            dep.start_superlink()
            path = flower_environment(work)["PATH"]
            extra_env = install_probe(work / "probe-bin", probe_dir, path)
            sizes = partition_sizes(cfg, partitions)  # each node's planning-records
            for i in range(args.clients):
                state_dir = work / "nodes" / f"node-{i}"
                write_node_policy(state_dir, cfg, sizes[i])
                config = {
                    "partition-id": i, "num-partitions": partitions,
                    "state-dir": str(state_dir),
                }  # fmt: skip
                dep.start_supernode(i, config, dep.node_key(i), wait=False,
                                    extra_env=extra_env)  # fmt: skip
            for i in range(args.clients):
                dep.wait_ready(i)
            idle = {i: tree_rss(h.process.pid) for i, h in dep.nodes.items()}
            # Flower's own cost of a node that waits: SuperNode + SuperExec polling
            # (after their start-up has settled).
            time.sleep(args.settle_seconds)
            idle0 = sum(_nodes_cpu(dep))
            time.sleep(args.idle_seconds)
            idle1 = sum(_nodes_cpu(dep))
            out["idle_cpu_per_s"] = (idle1 - idle0) / args.idle_seconds

            def sample() -> None:
                while not stop.is_set():
                    for i, handle in dep.nodes.items():
                        peaks[i] = max(peaks.get(i, 0), tree_rss(handle.process.pid))
                    time.sleep(0.1)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            assert dep.superlink is not None
            nodes0 = _nodes_cpu(dep)
            link_cpu0 = link_side_cpu(dep)
            run_config = work / "run.toml"
            run_config.write_text(tomli_w.dumps(overrides))
            started = time.monotonic()
            flwr_run = dep.run_app(run_config, APP_DIR)
            output, _ = flwr_run.communicate(timeout=args.timeout)
            out["run_seconds"] = time.monotonic() - started
            stop.set()
            sampler.join()
            nodes1 = _nodes_cpu(dep)
            out["supernode_cpu"] = nodes1[0] - nodes0[0]
            out["superexec_cpu"] = nodes1[1] - nodes0[1]
            out["link_cpu"] = link_side_cpu(dep) - link_cpu0
            out["flwr_run_tail"] = output[-2000:]
    finally:
        stop.set()
        stop_processes(descendants())
    out.update(peaks=peaks, idle=idle, messages=read_messages(probe_dir))
    summary_path = results / "summary.json"
    out["summary"] = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    rounds_path = results / "rounds.jsonl"
    out["rounds"] = (
        [json.loads(line) for line in rounds_path.read_text().splitlines() if line]
        if rounds_path.exists()
        else []
    )
    return out


def report(args: argparse.Namespace, out: dict[str, Any]) -> list[str]:
    """The measurements as Markdown."""
    cfg: RunConfig = out["cfg"]
    messages = out["messages"]
    status = out["summary"].get("status", "no summary.json")
    lines = [
        f"dataset {cfg.task}, features {cfg.features}, {args.clients} SuperNodes "
        f"(partitions of {out['partitions']}), {cfg.num_rounds} rounds, preset "
        f"{args.preset or '-'}, status {status}; load average before/after "
        f"{out['load_before']} / {out['load_after']}",
        "",
        *phase_rows([m for m in messages if m.get("message_type") == "train"]),
        "",
    ]
    kinds = sorted({str(m.get("message_type")) for m in messages})
    per_kind = ", ".join(
        f"{k}: {sum(m.get('message_type') == k for m in messages)}" for k in kinds
    )
    heavy = ", ".join(
        sorted({h for m in split_first(messages)[0] for h in m.get("heavy_modules", [])})
    )
    unwrapped = sorted({u for m in messages for u in m.get("unwrapped", [])})
    clientapp_cpu = sum(m["cpu_total"] for m in messages)
    later_heavy = ", ".join(
        sorted({h for m in split_first(messages)[1] for h in m.get("heavy_modules", [])})
    )
    seconds = [r["seconds"] for r in out["rounds"] if "seconds" in r]
    central = [
        r["timing_seconds"]["central_evaluation"]
        for r in out["rounds"]
        if "timing_seconds" in r
    ]
    peaks, idle = out["peaks"], out["idle"]
    lines += [
        "| measure | value |",
        "|---|---|",
        f"| messages by type | {per_kind or 'none recorded'} |",
        f"| heavy modules imported by a node's first message | {heavy or 'none'} |",
        f"| heavy modules imported by later messages | {later_heavy or 'none'} |",
        f"| ClientApp processes' CPU, all messages (start to exit) | "
        f"{clientapp_cpu:.1f} CPU-s |",
        f"| SuperNodes' / SuperExecs' own CPU during the run, all nodes | "
        f"{out['supernode_cpu']:.1f} / {out['superexec_cpu']:.1f} CPU-s |",
        f"| idle SuperNodes + SuperExecs, all nodes, before the run | "
        f"{out['idle_cpu_per_s']:.2f} CPU-s per s |",
        f"| SuperLink side CPU (SuperLink, nginx, SuperExec, ServerApp) | "
        f"{out['link_cpu']:.1f} CPU-s |",
        f"| round wall seconds (rounds.jsonl), each | "
        f"{', '.join(f'{s:.1f}' for s in seconds) or 'n/a'} |",
        f"| central evaluation wall seconds per round, median | "
        f"{_cell(_median(central))} |",
        f"| flwr run, submit to end (wall) | {out['run_seconds']:.1f} s |",
        f"| peak RSS per client tree (SuperNode + SuperExec + ClientApp), median | "
        f"{statistics.median(peaks.values()) / MIB:.0f} MiB |",
        f"| idle SuperNode tree RSS (median) | "
        f"{statistics.median(idle.values()) / MIB:.0f} MiB |",
    ]
    if unwrapped:
        lines.append(
            f"| phases not found in the app (not timed) | {', '.join(unwrapped)} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print Markdown tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=2, help="SuperNodes to start")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dataset", choices=task_names(), help="default: digits")
    p.add_argument("--data-dir", help="the dataset's files (run key data-dir)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="apply a preset's run keys")
    p.add_argument(
        "--num-partitions", type=int,
        help="shards the data is split into (default: --clients); the nodes serve the "
        "first --clients of them, so a preset's shard size can be measured on few nodes",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument(
        "--idle-seconds", type=float, default=10.0,
        help="measure the waiting nodes' own CPU this long before the run",
    )  # fmt: skip
    p.add_argument(
        "--settle-seconds", type=float, default=5.0,
        help="let the admitted nodes' start-up settle this long before --idle-seconds",
    )  # fmt: skip
    p.add_argument("--messages-out", type=Path, help="also save every message's record")
    p.add_argument("--no-bytes", action="store_true", help="skip the bytes measurement")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    if not args.preset and not args.dataset:
        args.dataset = "digits"
    become_subreaper()
    work = Path(tempfile.mkdtemp(prefix="privfed-bench-deploy-"))
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    out = run_bench(args, work)
    out["load_before"] = load_before
    out["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if args.messages_out:
        args.messages_out.write_text("".join(json.dumps(m) + "\n" for m in out["messages"]))
    lines = report(args, out)
    if not args.no_bytes:
        sizes = message_bytes(out["cfg"].task)
        lines += [
            f"| bytes down per round per client (train instruction) | "
            f"{sizes['down_bytes']:,} |",
            f"| bytes up per round per client (reply) | {sizes['up_bytes']:,} |",
            f"| model parameters | {sizes['model_parameters']:,} |",
        ]
    print("\n".join(lines))
    if args.keep_work:
        print(f"work folder kept: {work}")
    else:  # it holds every node's cached shard (95 MB per ScatterNet shard)
        shutil.rmtree(work, ignore_errors=True)
    if out["summary"].get("status") != "completed":
        print(out.get("flwr_run_tail", ""))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
