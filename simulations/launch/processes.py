"""Start and stop the Flower processes a script owns, by PID, also on failure.

The calling process becomes a Linux child subreaper, so processes that Ray or
Flower daemonise are re-parented to it instead of to init; teardown then finds
every one of them among its own descendants and stops each by PID.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import psutil

_PR_SET_CHILD_SUBREAPER = 36
# Grace for what is left at the end (orphans re-parented to the launcher): Ray's
# dashboard and runtime-env agents whose driver was killed ignore SIGTERM for
# more than 10 s, and need nothing that a SIGKILL takes from them.
LEFTOVER_GRACE_S = 3.0


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux only); return whether it worked."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP interrupt like Ctrl-C (a KeyboardInterrupt naming the
    signal), so that the launcher stops its run and its processes on all three."""

    def _raise(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def descendants(pid: int | None = None) -> list[psutil.Process]:
    """All live descendants of ``pid`` (default: this process)."""
    try:
        return psutil.Process(pid or os.getpid()).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its live descendants; empty when ``pid`` is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def wait_gone(procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited; return those still running after
    ``timeout`` s. Our own children are reaped; a zombie whose parent has not reaped
    it yet (e.g. a Ray worker whose raylet was stopped with it) counts as gone."""
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while True:
        running = []
        for proc in alive:
            try:
                proc.wait(timeout=0)  # reaps it if it is our child
            except psutil.TimeoutExpired:
                try:
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        running.append(proc)
                except psutil.NoSuchProcess:
                    pass
            except psutil.NoSuchProcess:
                pass
        alive = running
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def stop_processes(procs: Sequence[psutil.Process], grace: float = 10.0) -> list[int]:
    """SIGTERM each process, wait ``grace`` s, SIGKILL survivors; return killed PIDs."""
    alive = []
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
            alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    survivors = wait_gone(alive, grace)
    for proc in survivors:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    wait_gone(survivors, 5.0)
    return [p.pid for p in survivors]


def piped_process(
    argv: Sequence[str], env: Mapping[str, str], cwd: Path, stdin: int
) -> subprocess.Popen[str]:
    """A child whose output and errors come back as text lines, in a process group of
    its own, so that a terminal's Ctrl-C reaches the launcher only (which stops it)."""
    return subprocess.Popen(
        list(argv),
        env=dict(env),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=stdin,
        text=True,
        bufsize=1,
        process_group=0,
    )


class ManagedProcess:
    """A child process with its output in a log file, stopped with its whole tree."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        # The log may hold earlier runs of the same node; read only this one's part.
        self._log_offset = log_path.stat().st_size if log_path.exists() else 0
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Its own process group: a terminal's Ctrl-C reaches only the launcher,
            # which then stops the run in order instead of every process at once.
            process_group=0,
        )

    @property
    def pid(self) -> int:
        """The process ID."""
        return self.popen.pid

    def running(self) -> bool:
        """True while the process has not exited."""
        return self.popen.poll() is None

    def log_text(self) -> str:
        """Everything this process has written to its log so far."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        """The last lines this process wrote to its log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        """Stop the process and every descendant it started, by PID."""
        tree: list[psutil.Process] = []
        # Only while it has not been reaped is its PID surely still its own.
        if self.running():
            try:
                tree = [psutil.Process(self.pid), *descendants(self.pid)]
            except psutil.NoSuchProcess:
                pass
        stop_processes(tree, grace)
        self.popen.wait(timeout=max(grace, 5.0))
        self._log.close()


def wait_until(predicate: object, timeout: float, what: str, proc: ManagedProcess) -> None:
    """Poll ``predicate()`` until true; fail early if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running():
            raise RuntimeError(
                f"{proc.name} exited with code {proc.popen.returncode} while waiting "
                f"for {what}; its log ({proc.log_path}) ends with:\n{proc.log_tail()}"
            )
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise TimeoutError(
        f"timed out after {timeout:.0f} s waiting for {what}; {proc.name}'s log "
        f"({proc.log_path}) ends with:\n{proc.log_tail()}"
    )


def tree_rss(pid: int) -> int:
    """Summed resident memory of ``pid`` and its descendants, in bytes."""
    total = 0
    for proc in process_tree(pid):
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total
