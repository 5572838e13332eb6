"""SuperExecs woken when a task is stored (launch/superexec_wakeup.py).

The pause of a woken SuperExec ends at a wake-up, one sent before it began included,
and otherwise lasts Flower's default second; only a SuperExec of ours is ever sent
the signal. The lines of Flower's that the wrappers replace are pinned, so that a
Flower upgrade that moves them fails here rather than leaving SuperExecs asleep.
The end-to-end tests (a simulation, a deployment) check that their SuperExecs ran
this way and that every run and message was picked up.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
import time

import flwr.supercore.superexec.run_superexec as superexec_loop
import flwr.supernode.start_client_internal as node_loop
import psutil
import pytest
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

from simulations.launch import superexec_wakeup
from simulations.launch.superexec_wakeup import (
    IDLE_POLL_S,
    MODULE,
    Waker,
    superexec_command,
    superlink_command,
)

# A process that pauses as a woken SuperExec does, and reports how long each took:
# the first pause with a wake-up already pending, the second woken by its parent
# after 0.3 s, the third left alone (it lasts the idle limit).
PAUSES = textwrap.dedent(
    f"""
    import json, signal, sys, time
    from {MODULE} import WAKE, WakeableTime
    signal.pthread_sigmask(signal.SIG_BLOCK, {{WAKE}})
    pause = WakeableTime(idle=1.5)
    signal.raise_signal(WAKE)  # pending before the pause begins
    took = []
    for _ in range(3):
        start = time.monotonic()
        pause.sleep(0.1)
        took.append(time.monotonic() - start)
        print("paused", flush=True)
    print(json.dumps(took), flush=True)
    """
)


def test_a_pause_ends_at_a_wake_up_and_otherwise_lasts_the_idle_limit() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", PAUSES], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "paused\n"  # the pending wake-up was not lost
    time.sleep(0.3)
    child.send_signal(superexec_wakeup.WAKE)  # the second pause ends here
    lines = [child.stdout.readline() for _ in range(3)]
    assert child.wait(timeout=30) == 0
    first, second, third = json.loads(lines[-1])
    assert first < 0.2
    assert 0.25 < second < 1.2  # woken, not the 1.5 s limit
    assert 1.4 < third < 3.0  # no wake-up: the limit, then it asks again


def test_only_a_superexec_of_ours_is_woken() -> None:
    """SIGUSR1 would kill a stock process: a child that is not this module's
    SuperExec is never sent it."""
    stock = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)
        Waker().wake()
        time.sleep(0.5)
        assert stock.poll() is None
    finally:
        stock.kill()
        stock.wait()


def test_a_superexec_is_only_woken_once_it_has_blocked_the_signal() -> None:
    """Between its exec and its first lines a SuperExec of ours would die of the
    signal: it is sent only once /proc shows it blocked."""
    script = (
        "import signal, sys, time\n"
        "print('up', flush=True); sys.stdin.readline()\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
        "print('blocked', flush=True); time.sleep(30)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "up\n"
        assert not superexec_wakeup.blocks_wake(child.pid)  # still starting
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "blocked\n"
        assert superexec_wakeup.blocks_wake(child.pid)
        child.send_signal(superexec_wakeup.WAKE)  # what the waker then sends
        time.sleep(0.3)
        assert child.poll() is None  # pending, not fatal
    finally:
        child.kill()
        child.wait()
    assert not superexec_wakeup.blocks_wake(child.pid)  # gone


def test_commands() -> None:
    assert superexec_command(["flower-superexec", "--insecure"]) == [
        sys.executable, "-m", MODULE, "superexec", "--", "--insecure",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="flower-superexec"):
        superexec_command(["flwr-clientapp"])
    link = superlink_command("/x/flower-superlink", ["--insecure"])
    assert link[-2:] == ["/x/flower-superlink", "--insecure"]  # still recognisable
    assert superexec_wakeup.main(["nonsense"]) == 2
    assert IDLE_POLL_S == 1.0  # Flower's default: never slower than stock


def test_flowers_lines_that_the_wrappers_replace() -> None:
    """The SuperExec's loop pauses with ``time.sleep`` through its module's ``time``;
    the SuperNode starts ``flower-superexec`` with ``subprocess.Popen`` and stores
    messages in ``_pull_and_store_message``; the SuperLink builds its SuperExec's
    command in ``_get_superexec_command`` and stores runs with ``create_run``."""
    loop = inspect.getsource(superexec_loop.run_superexec)
    assert "time.sleep(task_poll_interval)" in loop
    assert superexec_loop.time is time
    node = inspect.getsource(node_loop.start_client_internal)
    assert 'command = ["flower-superexec"]' in node
    assert "subprocess.Popen(command)" in node
    assert "run_id = _pull_and_store_message(" in node
    source = inspect.getsource(node_loop._pull_and_store_message)
    assert "state.create_task(" in source  # a stored message is a task here
    import importlib

    link = importlib.import_module("flwr.superlink.cli.flower_superlink")
    command = link._get_superexec_command("127.0.0.1:1", None, None, 1, False)
    assert command[0] == "flower-superexec"
    assert "_get_superexec_command(" in inspect.getsource(link)
    for state in (InMemoryLinkState, SqlLinkState):
        assert "create_run" in vars(state)


def test_a_supernode_stores_then_wakes() -> None:
    """What the SuperNode wrapper does to Flower's module: its SuperExec starts through
    this module, and a stored message (a run id) wakes it; an empty pull does not."""

    class Loop:
        subprocess = None
        calls: list[object] = []

        @staticmethod
        def _pull_and_store_message(result: object) -> object:
            return result

    woken: list[int] = []
    original = Waker.wake
    Waker.wake = lambda self: woken.append(1)  # type: ignore[method-assign]
    try:
        superexec_wakeup.wake_supernode_superexec(Loop)
        assert Loop._pull_and_store_message(None) is None and not woken
        assert Loop._pull_and_store_message(7) == 7 and woken == [1]
    finally:
        Waker.wake = original  # type: ignore[method-assign]
    started = Loop.subprocess.Popen(  # type: ignore[attr-defined]
        ["flower-superexec", "--help"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert psutil.Process(started.pid).cmdline()[1:4] == ["-m", MODULE, "superexec"]
        out, _ = started.communicate(timeout=60)
        assert started.returncode == 0 and "--runtime-api-address" in out
    finally:
        if started.poll() is None:
            started.kill()
