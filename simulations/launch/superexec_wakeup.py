"""Flower's SuperExecs woken when a task is stored, instead of asking ten times a second.

Beside every SuperLink and SuperNode, Flower 1.42 runs a SuperExec that asks it for a
task to start (a run's ``flwr-simulation`` or ``flwr-serverapp``, a message's
``flwr-clientapp``) in a loop: ``AcquireTask``, then
``time.sleep(FLWR_SUPEREXEC_TASK_POLL_INTERVAL)``
(``flwr/supercore/superexec/run_superexec.py``). Each ask costs about 3.5 ms of the
SuperExec's CPU and 8 ms of the simulation SuperLink's that answers it, so the
interval is a trade: Flower's default 1 s starts each task up to a second late, and
the 0.1 s our launchers set cost the test suite about a tenth of its CPU in asks
that found nothing (BENCHMARKS.md, "SuperExecs woken, not polling").

Here the loop is unchanged, but its pause ends as soon as there is a task to take:

- The SuperExec runs as ``python -m simulations.launch.superexec_wakeup superexec --
  <its arguments>``: :data:`WAKE` (SIGUSR1) is blocked in all its threads, and the
  pause is ``sigtimedwait(WAKE, IDLE_POLL_S)``, so it lasts until the next wake-up,
  and never longer than Flower's default (in case a task came without one).
- The SuperLink (``... superlink -- flower-superlink <its arguments>``) and the
  SuperNode (:mod:`simulations.deployment.supernode_heartbeat`) start their SuperExec
  that way, and send it :data:`WAKE` right after they stored a task: a new run
  (``create_run``) on the SuperLink, a pulled message on the SuperNode.

A wake-up sent while the SuperExec is busy stays pending and ends its next pause at
once, so none is lost. :data:`WAKE` goes only to a child whose command line is this
module's SuperExec and that has blocked it (:func:`blocks_wake`): a stock one, or
ours in its first milliseconds, would die of it; a SuperExec that has not blocked it
yet has not asked for its first task either. The SuperLink, the SuperNode and
Flower's code run unchanged otherwise; a test pins the lines of Flower's this
depends on.
"""

from __future__ import annotations

import functools
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

MODULE = "simulations.launch.superexec_wakeup"
WAKE = signal.SIGUSR1
IDLE_POLL_S = 1.0  # Flower's own default interval: never slower than stock
SUPEREXEC = "flower-superexec"


def superexec_command(command: Sequence[str]) -> list[str]:
    """Flower's ``flower-superexec <args>`` command, run by this module instead."""
    if not command or Path(command[0]).name != SUPEREXEC:
        raise ValueError(f"not a {SUPEREXEC} command: {list(command)!r}")
    return [sys.executable, "-m", MODULE, "superexec", "--", *command[1:]]


def superlink_command(superlink: str, args: Sequence[str]) -> list[str]:
    """The command that runs ``flower-superlink <args>`` (its path ``superlink``, kept
    in the command line so the process is still recognisable) with a woken SuperExec."""
    return [sys.executable, "-m", MODULE, "superlink", "--", superlink, *args]


def _is_woken_superexec(proc: psutil.Process) -> bool:
    return proc.cmdline()[1:5] == ["-m", MODULE, "superexec", "--"]


def blocks_wake(pid: int) -> bool:
    """Whether ``pid`` has :data:`WAKE` blocked, so that it is safe to send: until its
    first lines ran, a fresh SuperExec would die of it (its default action). Its main
    thread blocks it before Flower starts any thread, and never unblocks it."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("SigBlk:"):
                    return bool(int(line.split()[1], 16) >> (WAKE - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


class Waker:
    """Sends :data:`WAKE` to this process's SuperExec, once it has one of ours."""

    def __init__(self) -> None:
        self._child: psutil.Process | None = None

    def wake(self) -> None:
        """Wake the SuperExec (if it runs yet); never raises."""
        try:
            if self._child is None or not self._child.is_running():
                self._child = next(
                    (p for p in psutil.Process().children() if _is_woken_superexec(p)),
                    None,
                )
            # not yet blocked: it is still starting, and its first ask comes after this
            if self._child is not None and blocks_wake(self._child.pid):
                self._child.send_signal(WAKE)
        except (psutil.Error, OSError):
            self._child = None  # it is gone or starting; its own pause bounds the wait


class WakeableTime:
    """``time`` for Flower's SuperExec loop, whose pause ends at the next wake-up."""

    def __init__(self, idle: float = IDLE_POLL_S) -> None:
        self.idle = idle

    def sleep(self, _seconds: float) -> None:
        """Wait for :data:`WAKE` (pending or new), at most ``idle`` seconds."""
        signal.sigtimedwait({WAKE}, self.idle)

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
    started through this module; everything else is the real ``subprocess``."""

    def Popen(self, command: Sequence[str], *args: Any, **kwargs: Any) -> Any:  # noqa: N802
        import subprocess

        if command and Path(command[0]).name == SUPEREXEC:
            command = superexec_command(command)
        return subprocess.Popen(command, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        import subprocess

        return getattr(subprocess, name)


def wake_supernode_superexec(node_loop: Any) -> None:
    """In a SuperNode process: start its SuperExec through this module, and wake it
    whenever the node stored a pulled message (``start_client_internal``)."""
    node_loop.subprocess = _WokenPopen()
    _wake_after(node_loop, "_pull_and_store_message", Waker())


def _run_superexec(args: list[str]) -> int | None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {WAKE})  # before Flower starts threads
    import flwr.supercore.superexec.run_superexec as loop
    from flwr.supercore.cli.flower_superexec import flower_superexec

    loop.time = WakeableTime()  # type: ignore[assignment]
    sys.argv = [SUPEREXEC, *args]
    return flower_superexec()  # type: ignore[func-returns-value]


def _run_superlink(args: list[str]) -> int | None:
    import importlib

    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    # the module, not the function of the same name its package exports
    link = importlib.import_module("flwr.superlink.cli.flower_superlink")
    waker = Waker()
    original = link._get_superexec_command

    @functools.wraps(original)
    def woken_command(*a: Any, **k: Any) -> list[str]:
        return superexec_command(original(*a, **k))

    link._get_superexec_command = woken_command
    for state in (InMemoryLinkState, SqlLinkState):  # whichever --database chose
        _wake_after(state, "create_run", waker)
    sys.argv = [args[0], *args[1:]]
    return link.flower_superlink()  # type: ignore[func-returns-value]


def main(argv: Sequence[str] | None = None) -> int | None:
    """``superexec -- <flower-superexec args>`` or ``superlink -- <flower-superlink
    path> <args>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] not in ("superexec", "superlink") or args[1] != "--":
        print(f"usage: python -m {MODULE} {{superexec,superlink}} -- <arguments>",
              file=sys.stderr)  # fmt: skip
        return 2
    if args[0] == "superexec":
        return _run_superexec(args[2:])
    if len(args) < 3:
        print(
            "superlink: give the flower-superlink path and its arguments", file=sys.stderr
        )
        return 2
    return _run_superlink(args[2:])


if __name__ == "__main__":
    sys.exit(main())
