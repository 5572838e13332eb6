"""Flower's SuperExecs woken when a task is stored, instead of asking ten times a second.

Beside every SuperLink and SuperNode, Flower 1.42 runs a SuperExec that asks it for a
task to start (a run's ``flwr-simulation`` or ``flwr-serverapp``, a message's
``flwr-clientapp``) in a loop: ``AcquireTask``, then
``time.sleep(FLWR_SUPEREXEC_TASK_POLL_INTERVAL)``
(``flwr/supercore/superexec/run_superexec.py``). Each ask costs both sides a few
milliseconds of CPU (about 3.5 ms in the SuperExec, 8 ms in a simulation SuperLink),
so the interval is a trade: Flower's default 1 s starts each task up to a second
late, and the 0.1 s our launchers set keeps idle nodes busy asking (BENCHMARKS.md,
"SuperExecs woken, not polling").

Here the loop is unchanged, but its pause ends as soon as there is a task to take:

- The SuperLink (``python -m simulations.launch.superexec_wakeup superlink --
  flower-superlink <its arguments>``) and the SuperNode (the heartbeat wrapper's
  ``--wake-superexec``) give their SuperExec the read end of a pipe. The SuperExec
  is forked from the wrapper (:mod:`.superexec_fork`), or where that cannot be,
  started through this module: ``... superexec --wake-fd N -- <its arguments>``.
- They write one byte to the pipe right after they stored a task: a new run
  (``create_run``) on the SuperLink, a pulled message on the SuperNode.
- The SuperExec's pause waits for a byte on that pipe, at most :data:`IDLE_POLL_S`
  (Flower's default 1 s, in case a task came without one), and takes one byte per
  pause: each stored task ends one pause, so a burst of tasks is taken one after
  the other without waiting, and a byte written while the SuperExec was busy or
  still starting ends its next pause at once. No wake-up is lost.

The pipe is the two processes' own (inherited by the SuperExec alone, never by the
tasks it starts); nothing else can wake it. The SuperLink, the SuperNode and Flower's
code run unchanged otherwise; a test pins the lines of Flower's this depends on.
Both wrapped processes show as ``python`` to ``ps -C``/``pgrep`` (their command lines
still name ``flower-superlink`` and the SuperExec's arguments).
"""

from __future__ import annotations

import functools
import os
import select
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from simulations.launch.superexec_fork import PROCESS_NAME as FORKED_NAME
from simulations.launch.superexec_fork import SuperExecFork, fork_superexec

MODULE = "simulations.launch.superexec_wakeup"
IDLE_POLL_S = 1.0  # Flower's own default interval: never slower than stock
SUPEREXEC = "flower-superexec"


def superexec_command(command: Sequence[str], wake_fd: int) -> list[str]:
    """Flower's ``flower-superexec <args>`` command, run by this module and woken
    through the pipe whose read end is ``wake_fd``."""
    if not command or Path(command[0]).name != SUPEREXEC:
        raise ValueError(f"not a {SUPEREXEC} command: {list(command)!r}")
    return [sys.executable, "-m", MODULE, "superexec", "--wake-fd", str(wake_fd), "--",
            *command[1:]]  # fmt: skip


def is_superexec(cmdline: Sequence[str], name: str = "") -> bool:
    """Whether a process is a SuperExec, by its command line (Flower's own, or one run
    by this module) or its ``name`` (``/proc/PID/comm``: one forked by a wrapper,
    :mod:`.superexec_fork`, which keeps its parent's command line)."""
    stock = any(Path(arg).name == SUPEREXEC for arg in cmdline[:2])
    return stock or list(cmdline[1:4]) == ["-m", MODULE, "superexec"] or name == FORKED_NAME


def superlink_command(superlink: str, args: Sequence[str]) -> list[str]:
    """The command that runs ``flower-superlink <args>`` (its path ``superlink``, kept
    in the command line so the process is still recognisable) with a woken SuperExec."""
    return [sys.executable, "-m", MODULE, "superlink", "--", superlink, *args]


class Waker:
    """The write end of the SuperExec's pipe: one byte per stored task."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def wake(self) -> None:
        """End one pause of the SuperExec (if it runs yet); never raises."""
        if self.fd is None:
            return  # not started: its first ask comes after the task was stored
        try:
            os.write(self.fd, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: thousands of wake-ups are pending already
        except OSError:  # it is gone
            os.close(self.fd)
            self.fd = None


class WakeableTime:
    """``time`` for Flower's SuperExec loop, whose pause ends at the next byte."""

    def __init__(self, fd: int, idle: float = IDLE_POLL_S) -> None:
        self.fd: int | None = fd
        self.idle = idle

    def sleep(self, _seconds: float) -> None:
        """Take one byte from the pipe, waiting at most ``idle`` seconds for it."""
        if self.fd is None:  # its parent is gone: Flower's own pause
            time.sleep(self.idle)
            return
        ready, _, _ = select.select([self.fd], [], [], self.idle)
        if ready and os.read(self.fd, 1) == b"":
            os.close(self.fd)  # end of file: no more wake-ups will come
            self.fd = None

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _wake_after(owner: Any, name: str, waker: Waker) -> None:
    """Make ``owner.name`` wake the SuperExec once it returned (with a result that is
    not ``None``, for the SuperNode's pull: ``None`` means nothing was stored)."""
    original: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(original)
    def stored_then_wake(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if result is not None:
            waker.wake()
        return result

    setattr(owner, name, stored_then_wake)


class _WokenPopen:
    """``subprocess`` for a module that starts ``flower-superexec``: that command is
    run by ``fork`` (:mod:`.superexec_fork`) where it can be, else started through
    this module, with a pipe whose write end goes to ``waker``; everything else is
    the real ``subprocess``."""

    def __init__(self, waker: Waker, fork: SuperExecFork | None = None) -> None:
        self.waker = waker
        self.fork = fork

    def Popen(self, command: Sequence[str], *args: Any, **kwargs: Any) -> Any:  # noqa: N802
        import subprocess

        if not command or Path(command[0]).name != SUPEREXEC:
            return subprocess.Popen(command, *args, **kwargs)
        fork, self.fork = self.fork, None  # one SuperExec per fork
        if fork is not None and fork.can_start(args, kwargs):
            started = fork.start(list(command), bool(kwargs.get("start_new_session")))
            self._wake_through(fork.wake_fd)
            return started
        if fork is not None:
            fork.abandon()
        read, write = os.pipe()
        os.set_blocking(write, False)  # a full pipe never holds up the node
        kwargs["pass_fds"] = (*kwargs.get("pass_fds", ()), read)
        try:
            started = subprocess.Popen(superexec_command(command, read), *args, **kwargs)
        except BaseException:
            os.close(write)
            raise
        finally:
            os.close(read)
        self._wake_through(write)
        return started

    def _wake_through(self, write_fd: int) -> None:
        if self.waker.fd is not None:
            os.close(self.waker.fd)
        self.waker.fd = write_fd

    def __getattr__(self, name: str) -> Any:
        import subprocess

        return getattr(subprocess, name)


def wake_supernode_superexec(node_loop: Any) -> Waker:
    """In a SuperNode process: fork its SuperExec now (started through this module
    where it cannot be), and wake it whenever the node stored a pulled message
    (``start_client_internal``)."""
    waker = Waker()
    node_loop.subprocess = _WokenPopen(waker, _superexec_fork())
    _wake_after(node_loop, "_pull_and_store_message", waker)
    return waker


def _superexec_fork() -> SuperExecFork | None:
    """The SuperExec forked now (:mod:`.superexec_fork`), after its modules are
    imported here: the fork shares them instead of importing them again."""
    import flwr.supercore.cli.flower_superexec  # noqa: F401
    import flwr.supercore.superexec.run_superexec  # noqa: F401

    return fork_superexec(_run_superexec)


def _run_superexec(wake_fd: int, args: list[str]) -> int | None:
    """Flower's ``flower-superexec`` with ``args``, its pauses ended through
    ``wake_fd`` (also what a forked SuperExec runs)."""
    import flwr.supercore.superexec.run_superexec as loop
    from flwr.supercore.cli.flower_superexec import flower_superexec

    os.set_inheritable(wake_fd, False)  # never passed on to the tasks it starts
    loop.time = WakeableTime(wake_fd)  # type: ignore[assignment]
    sys.argv = [SUPEREXEC, *args]
    return flower_superexec()  # type: ignore[func-returns-value]


def _run_superlink(args: list[str]) -> int | None:
    import importlib

    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    # the module, not the function of the same name its package exports
    link = importlib.import_module("flwr.superlink.cli.flower_superlink")
    waker = Waker()
    link.subprocess = _WokenPopen(waker, _superexec_fork())
    for state in (InMemoryLinkState, SqlLinkState):  # whichever --database chose
        _wake_after(state, "create_run", waker)
    sys.argv = list(args)
    return link.flower_superlink()  # type: ignore[func-returns-value]


def main(argv: Sequence[str] | None = None) -> int | None:
    """``superexec --wake-fd N -- <flower-superexec args>`` or ``superlink --
    <flower-superlink path> <args>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:2] == ["superexec", "--wake-fd"] and args[2:3] != [] and args[3:4] == ["--"]:
        if args[2].isdigit():
            return _run_superexec(int(args[2]), args[4:])
    elif args[:2] == ["superlink", "--"] and len(args) >= 3:
        return _run_superlink(args[2:])
    print(f"usage: python -m {MODULE} superexec --wake-fd N -- <its arguments>\n"
          f"       python -m {MODULE} superlink -- <flower-superlink> <its arguments>",
          file=sys.stderr)  # fmt: skip
    return 2


if __name__ == "__main__":
    sys.exit(main())
