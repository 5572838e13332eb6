"""A SuperNode's or SuperLink's SuperExec forked from it instead of started cold.

Flower 1.42's SuperNode and SuperLink start their SuperExec as a new Python process
(``flower-superexec``), which imports Flower again before its first ask for a task:
about 1.2 CPU-s, paid by every SuperNode and every SuperLink a launcher starts. The
wrappers of :mod:`.superexec_wakeup` have imported what the SuperExec runs already.
So, before Flower starts any thread (gRPC servers, heartbeats), :func:`fork_superexec`
forks the wrapper once. The fork waits on a pipe; when Flower asks to start
``flower-superexec <args>``, the parent sends it those arguments, its environment and
its working folder, and the fork runs Flower's SuperExec entry point with them, woken
as before. It is the parent's child, as the started process was: Flower's
``--parent-pid`` check and a new session (the SuperLink's) work as for a process it
started; and the kernel kills it when its parent exits.

Its command line stays its parent's; its name (``ps``, ``/proc/PID/comm``) is
:data:`PROCESS_NAME`, which :func:`.superexec_wakeup.is_superexec` recognises. A
wrapper that has a thread already, or cannot fork, starts the SuperExec cold, as
before; so does a start with any other ``Popen`` argument (its streams, say), which a
fork cannot honour. A fork that is never asked exits when its parent closes the pipe
or dies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from simulations.launch.forked import die_with_parent, fresh_random_state, name_process

PROCESS_NAME = "flwr-superexec"  # at most 15 bytes: the kernel's limit for a name
# What a fork can honour of the arguments Flower passes to Popen for its SuperExec
# (the SuperLink's ``get_popen_detach_kwargs()`` on Linux).
FORKABLE_KWARGS = frozenset({"start_new_session"})
WAIT_STEP_S = 0.01

SuperExecMain = Callable[[int, list[str]], int | None]  # (wake fd, its arguments)


class ForkedProcess:
    """The part of ``subprocess.Popen`` that Flower uses on its SuperExec: ``pid``,
    ``poll``, ``wait`` (with ``TimeoutExpired``), ``terminate`` and ``kill``."""

    def __init__(self, pid: int, args: list[str]) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit code if it has exited (reaped here), else ``None``."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its code is unknown
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit, at most ``timeout`` seconds (``TimeoutExpired``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(WAIT_STEP_S)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal it, unless it has been reaped."""
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        """SIGTERM, as ``Popen.terminate``."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, as ``Popen.kill``."""
        self.send_signal(signal.SIGKILL)


class SuperExecFork:
    """The parent's end of a waiting fork: :meth:`start` it once, with Flower's
    command; ``wake_fd`` is the write end of its wake-up pipe."""

    def __init__(self, pid: int, request_fd: int, wake_fd: int) -> None:
        self.pid = pid
        self._request_fd: int | None = request_fd
        self.wake_fd = wake_fd

    def can_start(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
        """Whether a ``Popen(command, *args, **kwargs)`` can be this fork's start."""
        return self._request_fd is not None and not args and set(kwargs) <= FORKABLE_KWARGS

    def start(self, command: list[str], new_session: bool = False) -> ForkedProcess:
        """Have the fork run ``flower-superexec`` with ``command[1:]``, now."""
        if self._request_fd is None:
            raise RuntimeError("this SuperExec fork was started already")
        request = {
            "args": command[1:], "environ": dict(os.environ), "cwd": os.getcwd(),
            "new_session": new_session,
        }  # fmt: skip
        fd, self._request_fd = self._request_fd, None
        try:
            with os.fdopen(fd, "wb") as pipe:
                pipe.write(json.dumps(request).encode())
        except BrokenPipeError:  # the fork died waiting: reported as its exit
            pass
        return ForkedProcess(self.pid, command)

    def abandon(self) -> None:
        """No SuperExec from this fork: close its pipe (it exits at once) and reap it."""
        if self._request_fd is None:
            return
        os.close(self._request_fd)
        self._request_fd = None
        os.close(self.wake_fd)
        ForkedProcess(self.pid, []).wait(timeout=10.0)


def fork_superexec(run: SuperExecMain) -> SuperExecFork | None:
    """Fork the waiting SuperExec from this process; ``None`` where it cannot be
    forked safely (a thread runs already) or at all (the caller starts it cold)."""
    if threading.active_count() != 1:
        return None
    request_read, request_write = os.pipe()
    wake_read, wake_write = os.pipe()
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        for fd in (request_read, request_write, wake_read, wake_write):
            os.close(fd)
        return None
    if pid == 0:  # the fork: never returns
        os.close(request_write)
        os.close(wake_write)
        _serve(request_read, wake_read, run, parent)
    os.close(request_read)
    os.close(wake_read)
    os.set_blocking(wake_write, False)  # a full pipe never holds up the parent
    os.set_inheritable(request_write, False)
    os.set_inheritable(wake_write, False)
    return SuperExecFork(pid, request_write, wake_write)


def _serve(request_fd: int, wake_fd: int, run: SuperExecMain, parent: int) -> None:
    """In the fork: wait for the start request, then be the SuperExec; exit with its
    code, never returning into the parent's code.

    It is killed when its parent exits (``PR_SET_PDEATHSIG``). Flower's own check
    (``--parent-pid``, a poll that raises SIGINT) reached a SuperExec that was
    backing off between connection attempts to a node that failed at start, and its
    exit then took longer than the node's whole life (seen in the deployment tests).
    A started SuperExec began its attempts 1.2 s later, when the node had settled."""
    code = 1
    try:
        die_with_parent(parent, signal.SIGKILL)  # SystemExit(0) if it is gone already
        _close_other_fds({0, 1, 2, request_fd, wake_fd})
        with os.fdopen(request_fd, "rb") as pipe:
            data = pipe.read()
        if not data:  # the parent closed the pipe or died: no SuperExec wanted
            code = 0
            return
        request = json.loads(data)
        if request["new_session"]:
            os.setsid()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["environ"])
        name_process(PROCESS_NAME)
        fresh_random_state()
        returned = run(wake_fd, list(request["args"]))
        code = returned if isinstance(returned, int) else 0
    except SystemExit as exc:  # Flower's entry point exits through SystemExit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _close_other_fds(keep: set[int]) -> None:
    """Close what the parent had open besides ``keep``, as ``Popen`` (``close_fds``)
    does for the process it starts."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:  # the listing's own fd, closed by now
                pass
