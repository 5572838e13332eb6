"""Play a fault schedule against a running deployment, and heal it on every path.

Each fault waits for its round (``rounds.jsonl`` holds ``round - 1`` records),
then its ``after`` seconds, acts, waits its duration and undoes itself. Every
step is a line of ``faults.jsonl`` in the results folder (time, round, kind,
nodes, what happened), which the soak's verdict reads to say why a node dropped
and how it came back. :meth:`FaultInjector.stop` heals whatever is still
broken (links up, processes continued, proxy rules cleared, caps removed), so a
run that ends early never leaves a node frozen or a link down.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from common.atomic_files import atomic_write_bytes
from simulations.deployment.faults import Fault, FaultSchedule
from simulations.deployment.local import ADMITTED_MARK, LocalDeployment
from simulations.deployment.netns import LabView
from simulations.launch.flwr_run import serverapp_processes
from simulations.launch.superexec_wakeup import is_superexec

FAULTS_LOG = "faults.jsonl"
RESTART_TIMEOUT_S = 180.0
# A killed node is started again no sooner than this long after its heartbeat lapsed
# (see FaultInjector._kill): many times the ServerApp's longest pause between pulls
# (server/messaging.py, 0.1 s), so that it reads Flower's "Node Unavailable" first.
AFTER_LAPSE_S = 2.0
JOIN_TIMEOUT_S = 20.0
# How often a `+task` fault looks at its nodes' processes (a ClientApp runs a second
# or more, so a task is not missed).
TASK_POLL_S = 0.05


def rounds_recorded(results_dir: Path) -> int:
    """How many rounds ``rounds.jsonl`` holds now."""
    try:
        return len((results_dir / "rounds.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def runs_task(pid: int) -> bool:
    """Whether the node process ``pid`` runs a task now: its SuperExec has a live
    child (Flower's SuperExec starts each task, e.g. a message's ``flwr-clientapp``,
    as a process of its own, and reaps it only when it starts the next one)."""
    try:
        for proc in psutil.Process(pid).children(recursive=True):
            if is_superexec(proc.cmdline(), proc.name()) and any(
                child.status() != psutil.STATUS_ZOMBIE for child in proc.children()
            ):
                return True
    except psutil.Error:  # the node or a process of it is gone
        return False
    return False


def _signal_tree(pid: int, sig: signal.Signals) -> int:
    """Send ``sig`` to ``pid`` and its descendants (parents first); return how many."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    sent = 0
    for proc in tree:
        try:
            proc.send_signal(sig)
            sent += 1
        except psutil.NoSuchProcess:
            pass
    return sent


class FaultInjector:
    """Fire each fault of ``schedule`` in its own thread; log it; undo it."""

    def __init__(
        self,
        schedule: FaultSchedule,
        dep: LocalDeployment,
        lab: LabView,
        rules_file: Path,
        results_dir: Path,
        on_superlink_kill: Callable[[Fault], None] | None = None,
    ) -> None:
        self.schedule = schedule
        self.dep = dep
        self.lab = lab
        self.rules_file = rules_file
        self.results_dir = results_dir
        self.on_superlink_kill = on_superlink_kill
        self.events: list[dict[str, Any]] = []
        self.expected_exits: set[int] = set()  # nodes killed on purpose
        self._rules: dict[str, dict[str, Any]] = {}
        self._frozen: set[int] = set()
        self._down: set[int] = set()
        self._capped: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._fired: set[int] = set()  # faults (by index) that have acted

    def log(self, kind: str, nodes: tuple[int, ...], what: str, **extra: Any) -> None:
        """Append one event to ``faults.jsonl`` and print it."""
        event = {"at": time.time(), "round": self.current_round(), "kind": kind,
                 "nodes": list(nodes), "what": what, **extra}  # fmt: skip
        with self._lock:
            self.events.append(event)
            with open(self.results_dir / FAULTS_LOG, "a") as fh:
                fh.write(json.dumps(event) + "\n")
        print(f"[soak] round {event['round']}: {kind} {list(nodes)}: {what}", flush=True)

    def current_round(self) -> int:
        """The round under way (records so far + 1)."""
        return rounds_recorded(self.results_dir) + 1

    def start(self) -> None:
        """Start one thread per fault that has not acted yet (again after a
        :meth:`stop`, for a resumed run: the faults still to come)."""
        self._stop = threading.Event()
        self._threads = []
        for index, fault in enumerate(self.schedule.faults):
            if index in self._fired:
                continue
            thread = threading.Thread(target=self._play, args=(index, fault), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _wait(self, seconds: float) -> bool:
        """Sleep unless stopped; True when the injector was stopped."""
        return self._stop.wait(max(seconds, 0.0))

    def _play(self, index: int, fault: Fault) -> None:
        pause = TASK_POLL_S if fault.at_task else 0.5
        while rounds_recorded(self.results_dir) < fault.round - 1:
            if self._wait(pause):
                return
        if fault.at_task:
            if not self._wait_for_tasks(fault):
                return
        elif self._wait(fault.after):
            return
        self._fired.add(index)
        try:
            getattr(self, "_" + fault.kind.replace("-", "_"))(fault)
        except Exception as exc:  # a fault that cannot be played is logged, not fatal
            self.log(fault.kind, fault.nodes, f"could not be played: {exc}", error=True)

    def _wait_for_tasks(self, fault: Fault) -> bool:
        """Until every node of ``fault`` runs a task (``+task``); False when the
        injector was stopped, or when the round ended first (logged as not played)."""
        waiting = set(fault.nodes)
        while True:
            waiting = {i for i in waiting if not runs_task(self.dep.nodes[i].process.pid)}
            if not waiting:
                return True
            if rounds_recorded(self.results_dir) >= fault.round:
                self.log(
                    fault.kind, fault.nodes,
                    f"could not be played: round {fault.round} ended before node(s) "
                    f"{sorted(waiting)} ran a task", error=True,
                )  # fmt: skip
                return False
            if self._wait(TASK_POLL_S):
                return False

    def _kill(self, fault: Fault) -> None:
        for i in fault.nodes:
            self.expected_exits.add(i)
            old = self.dep.nodes[i].process.log_text()
            killed = time.monotonic()
            self.dep.kill_supernode(i)
            self.log("kill", (i,), "SIGKILL (node and its ClientApps)")
            # The SuperLink refuses the node until its heartbeat lapses; a node let in
            # the moment it lapses can beat the ServerApp's next pull, and Flower then
            # never answers for the message the killed node had taken: the round waits
            # for its timeout (docs/faults.md). Earlier starts would only be refused.
            lapse = killed + self.dep.nodes[i].heartbeat_lapse_s + AFTER_LAPSE_S
            if self._wait(max(fault.duration, lapse - time.monotonic())):
                return
            started = time.monotonic()
            handle = self.dep.restart_supernode(i, RESTART_TIMEOUT_S)
            node_id = _admitted_id(handle.process.log_text())
            self.log(
                "kill", (i,),
                f"restarted with the same key and state folder; re-admitted after "
                f"{time.monotonic() - started:.0f} s as node ID {node_id}"
                + (" (a new ID)" if node_id and node_id != _admitted_id(old) else ""),
                rejoin="restart", rejoin_seconds=round(time.monotonic() - started, 1),
            )  # fmt: skip
            self.expected_exits.discard(i)

    def _freeze(self, fault: Fault) -> None:
        for i in fault.nodes:
            self._frozen.add(i)
            count = _signal_tree(self.dep.nodes[i].process.pid, signal.SIGSTOP)
            self.log("freeze", (i,), f"SIGSTOP ({count} processes)")
        self._wait(fault.duration)
        for i in fault.nodes:
            self._thaw(i)

    def _thaw(self, i: int) -> None:
        if i in self._frozen:
            self._frozen.discard(i)
            count = _signal_tree(self.dep.nodes[i].process.pid, signal.SIGCONT)
            self.log("freeze", (i,), f"SIGCONT ({count} processes)", rejoin="thawed")

    def _partition(self, fault: Fault) -> None:
        for i in fault.nodes:
            self._down.add(i)
            self.lab.set_link(self.lab.hosts[i], up=False)
        self.log("partition", fault.nodes, f"links down for {fault.duration:g} s")
        self._wait(fault.duration)
        self._heal_links(fault.nodes)

    def _heal_links(self, nodes: tuple[int, ...]) -> None:
        healed = tuple(i for i in nodes if i in self._down)
        for i in healed:
            self.lab.set_link(self.lab.hosts[i], up=True)
            self._down.discard(i)
        if healed:
            alive = [i for i in healed if self.dep.nodes[i].process.running()]
            self.log(
                "partition", healed,
                f"links up; {len(alive)} of {len(healed)} SuperNodes still running "
                "(they reconnect by themselves, same node ID)",
                rejoin="link-up",
            )  # fmt: skip

    def _proxy_fault(self, fault: Fault, rule: dict[str, Any], what: str) -> None:
        peers = [self.lab.hosts[i].address for i in fault.nodes]
        with self._lock:
            for peer in peers:
                self._rules[peer] = rule
            self._write_rules()
        self.log(fault.kind, fault.nodes, f"{what} for {fault.duration:g} s (proxy)")
        self._wait(fault.duration)
        with self._lock:
            for peer in peers:
                self._rules.pop(peer, None)
            self._write_rules()
        self.log(fault.kind, fault.nodes, "proxy rule lifted", rejoin="link-up")

    def _write_rules(self) -> None:
        atomic_write_bytes(self.rules_file, json.dumps(self._rules).encode())

    def _delay(self, fault: Fault) -> None:
        self._proxy_fault(
            fault, {"delay_ms": int(fault.value or 0)}, f"+{fault.value:g} ms"
        )

    def _stall(self, fault: Fault) -> None:
        self._proxy_fault(fault, {"stalled": True}, "bytes held")

    def _drop(self, fault: Fault) -> None:
        self._proxy_fault(fault, {"dropped": True}, "connections reset")

    def _cap(self, fault: Fault) -> None:
        for i in fault.nodes:
            self._capped.add(i)
            self.lab.cap_rate(self.lab.hosts[i], int(fault.value or 0))
        self.log(
            "cap", fault.nodes, f"tc tbf {fault.value:g} kbit/s for {fault.duration:g} s"
        )
        self._wait(fault.duration)
        for i in fault.nodes:
            self.lab.cap_rate(self.lab.hosts[i], None)
            self._capped.discard(i)
        self.log("cap", fault.nodes, "cap removed")

    def _superlink_kill(self, fault: Fault) -> None:
        link = self.dep.superlink
        if link is None:
            raise RuntimeError("no SuperLink to kill")
        link.stop(grace=0.0)
        # The ServerApp is the SuperExec's child, not the SuperLink's: a host crash
        # takes it too.
        serverapps = serverapp_processes()
        for proc in serverapps:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        self.log(
            "superlink-kill", (),
            f"SIGKILL (SuperLink, and {len(serverapps)} ServerApp process(es))",
        )  # fmt: skip
        if self.on_superlink_kill is not None:
            self.on_superlink_kill(fault)

    def stop(self) -> None:
        """Stop every fault and heal: continue frozen nodes, links up, rules cleared."""
        self._stop.set()
        for i in list(self._frozen):
            self._thaw(i)
        self._heal_links(tuple(self._down))
        for i in list(self._capped):
            self.lab.cap_rate(self.lab.hosts[i], None)
        with self._lock:
            if self._rules:
                self._rules.clear()
                self._write_rules()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.1))


def _admitted_id(log_text: str) -> str | None:
    """The node ID of the last admission in a SuperNode's log."""
    lines = [ln for ln in log_text.splitlines() if ADMITTED_MARK in ln]
    return lines[-1].split(ADMITTED_MARK, 1)[1].split()[0] if lines else None


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists (used for the SuperLink's ServerApp)."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
