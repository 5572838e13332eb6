"""Watch the processes a script starts: PIDs, listening sockets, and cleanup."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.helpers.listening import listening

REPO = Path(__file__).resolve().parents[2]
# The scripts each thread started: what a run started ahead (runs_ahead.py) stops
# if its test never comes to take it.
STARTED_BY_THREAD: dict[int, list[subprocess.Popen[str]]] = {}


@dataclass
class Watch:
    """PIDs and listening sockets seen under the script while it ran."""

    pids: dict[int, float] = field(default_factory=dict)  # pid -> create_time
    names: set[str] = field(default_factory=set)
    commands: set[str] = field(default_factory=set)  # whole command lines
    programs: dict[int, str] = field(default_factory=dict)  # pid -> process name
    listening: set[tuple[str, int, str]] = field(default_factory=set)


def watch_tree(root: psutil.Process, watch: Watch, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            procs = root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for proc in procs:
            try:
                if proc.pid not in watch.pids:
                    watch.pids[proc.pid] = proc.create_time()
                # Every time: a child seen between fork and exec still shows its
                # parent's command line (more often on a busy machine).
                cmdline = proc.cmdline()
                watch.names.add(" ".join(cmdline[:2]) or proc.name())
                watch.commands.add(" ".join(cmdline))
                watch.programs[proc.pid] = proc.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        for pid, sockets in listening(p.pid for p in procs).items():
            name = watch.programs.get(pid, str(pid))
            watch.listening.update((ip, port, name) for ip, port in sockets)
        time.sleep(0.3)


def _default_sigint() -> None:
    # A suite started from a background shell inherits SIGINT as ignored, and Python
    # keeps an ignored SIGINT ignored; a script gets Ctrl-C as a terminal gives it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_script(
    module: str,
    args: list[str],
    own_group: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """Start ``python -m module args``; ``own_group``: as a terminal's foreground
    job, the leader of its own process group (see :func:`signal_after`); ``env``:
    variables set for the script beyond this process's own."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_default_sigint,
        process_group=0 if own_group else None,
    )
    STARTED_BY_THREAD.setdefault(threading.get_ident(), []).append(proc)
    return proc


@contextmanager
def watching(proc: subprocess.Popen[str]) -> Iterator[Watch]:
    """Record ``proc``'s process tree while the block runs; kill it if still alive."""
    watch, stop = Watch(), threading.Event()
    watcher = threading.Thread(
        target=watch_tree, args=(psutil.Process(proc.pid), watch, stop)
    )
    watcher.start()
    try:
        yield watch
    finally:
        stop.set()
        watcher.join()
        if proc.poll() is None:
            proc.kill()


def run_watched(
    args: list[str],
    timeout: float = 600,
    module: str = "simulations.run",
    env: dict[str, str] | None = None,
) -> tuple[int, str, Watch]:
    proc = start_script(module, args, env=env)
    with watching(proc) as watch:
        out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out, watch


def assert_all_gone(watch: Watch) -> None:
    assert watch.pids, "the watcher saw no child processes at all"
    deadline = time.monotonic() + 10
    leftovers: list[str] = []
    while time.monotonic() < deadline:
        leftovers = []
        for pid, created in watch.pids.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    leftovers.append(f"{pid} {proc.name()} {' '.join(proc.cmdline()[:3])}")
            except psutil.NoSuchProcess:
                continue
        if not leftovers:
            return
        time.sleep(0.5)
    pytest.fail(f"processes left running: {leftovers}")


def assert_loopback_only(watch: Watch) -> None:
    assert watch.listening, "no listening socket seen (the SuperLink should have one)"
    for ip, port, name in watch.listening:
        addr = ipaddress.ip_address(ip)
        mapped = getattr(addr, "ipv4_mapped", None)  # e.g. ::ffff:127.0.0.1
        assert (mapped or addr).is_loopback, f"{name} listens on {ip}:{port}"


def signal_after(
    module: str,
    args: list[str],
    mark: str,
    sig: signal.Signals,
    timeout: float = 300,
    to_group: bool = False,
) -> tuple[int, str, Watch]:
    """Run a script, send it ``sig`` once it prints a line containing ``mark``.

    ``to_group``: send it to the script's whole process group, as a terminal
    sends Ctrl-C to its foreground job (every process that stayed in the group
    gets it, not just the script).
    """
    proc = start_script(module, args, own_group=to_group)
    lines: list[str] = []
    with watching(proc) as watch:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if mark in line:
                if to_group:
                    os.killpg(proc.pid, sig)
                else:
                    proc.send_signal(sig)
                break
        rest, _ = proc.communicate(timeout=timeout)
        lines.append(rest)
    return proc.returncode, "".join(lines), watch
