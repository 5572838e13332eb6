"""SuperExecs woken when a task is stored (launch/superexec_wakeup.py).

The pause of a woken SuperExec ends at each byte on its pipe (one written before it
began included, one per task of a burst) and otherwise lasts Flower's default
second; the waker never blocks or raises. The lines of Flower's that the wrappers
replace are pinned, so that a Flower upgrade that moves them fails here rather than
leaving SuperExecs asleep. The end-to-end tests (a simulation, a sweep, a
deployment) check that their SuperExecs ran this way and that every run and message
was picked up.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
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

# A process that pauses as a woken SuperExec does, and reports how long each pause
# took: [pending byte, woken after 0.3 s, none (the limit), a burst of 3 x 3, EOF].
PAUSES = textwrap.dedent(
    f"""
    import json, sys, time
    from {MODULE} import WakeableTime
    pause = WakeableTime(int(sys.argv[1]), idle=1.5)
    took = []
    for i in range(7):
        start = time.monotonic()
        pause.sleep(0.1)
        took.append(time.monotonic() - start)
        if i in (0, 2):
            print("paused", flush=True)
    print(json.dumps(took), flush=True)
    """
)


def test_a_pause_ends_at_each_wake_up_and_otherwise_lasts_the_idle_limit() -> None:
    read, write = os.pipe()
    os.write(write, b"\0")  # stored before the SuperExec's pause began
    child = subprocess.Popen(
        [sys.executable, "-c", PAUSES, str(read)], pass_fds=(read,),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    os.close(read)
    assert child.stdout is not None
    assert child.stdout.readline() == "paused\n"  # the pending byte was not lost
    time.sleep(0.3)
    os.write(write, b"\0")  # the second pause ends here; the third is left alone
    assert child.stdout.readline() == "paused\n"
    os.write(write, b"\0\0\0")  # three tasks stored while it was busy
    time.sleep(0.1)
    os.close(write)  # then its parent goes away: end of file, then the limit
    took = json.loads(child.stdout.readline())
    assert child.wait(timeout=30) == 0
    assert took[0] < 0.2
    assert 0.25 < took[1] < 1.2  # woken, not the 1.5 s limit
    assert 1.4 < took[2] < 3.0  # no wake-up: the limit, then it asks again
    assert all(t < 0.3 for t in took[3:6]), took  # one pause per stored task
    assert took[6] < 0.3  # end of file ends it once; later pauses are the limit


def test_the_waker_never_blocks_or_raises() -> None:
    waker = Waker()
    waker.wake()  # no SuperExec yet: nothing to do
    read, write = os.pipe()
    os.set_blocking(write, False)
    waker.fd = write
    for _ in range(70_000):  # more than a pipe holds: the rest are dropped
        waker.wake()
    os.close(read)
    waker.wake()  # the SuperExec is gone
    assert waker.fd is None


def test_commands() -> None:
    assert superexec_command(["flower-superexec", "--insecure"], 7) == [
        sys.executable, "-m", MODULE, "superexec", "--wake-fd", "7", "--", "--insecure",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="flower-superexec"):
        superexec_command(["flwr-clientapp"], 7)
    link = superlink_command("/x/flower-superlink", ["--insecure"])
    assert link[-2:] == ["/x/flower-superlink", "--insecure"]  # still recognisable
    assert superexec_wakeup.main(["nonsense"]) == 2
    assert superexec_wakeup.main(["superexec", "--wake-fd", "x", "--"]) == 2
    assert IDLE_POLL_S == 1.0  # Flower's default: never slower than stock
    assert superexec_wakeup.is_superexec(superexec_command(["flower-superexec"], 7))
    assert superexec_wakeup.is_superexec(["/usr/bin/python", "/v/bin/flower-superexec"])
    assert not superexec_wakeup.is_superexec(["python", "-m", MODULE, "superlink"])


def test_flowers_lines_that_the_wrappers_replace() -> None:
    """The SuperExec's loop pauses with ``time.sleep`` through its module's ``time``;
    the SuperNode and the SuperLink start ``flower-superexec`` with their module's
    ``subprocess.Popen``; the SuperNode stores messages in ``_pull_and_store_message``
    and the SuperLink runs with ``create_run``."""
    loop = inspect.getsource(superexec_loop.run_superexec)
    assert "time.sleep(task_poll_interval)" in loop
    assert superexec_loop.time is time
    node = inspect.getsource(node_loop.start_client_internal)
    assert 'command = ["flower-superexec"]' in node
    assert "subprocess.Popen(command)" in node
    assert "run_id = _pull_and_store_message(" in node
    source = inspect.getsource(node_loop._pull_and_store_message)
    assert "state.create_task(" in source  # a stored message is a task here
    link = importlib.import_module("flwr.superlink.cli.flower_superlink")
    command = link._get_superexec_command("127.0.0.1:1", None, None, 1, False)
    assert command[0] == "flower-superexec"
    assert "subprocess.Popen(command, **get_popen_detach_kwargs())" in inspect.getsource(
        link
    )
    for state in (InMemoryLinkState, SqlLinkState):
        assert "create_run" in vars(state)


def test_a_supernode_starts_its_superexec_with_a_pipe_and_wakes_it_per_message() -> None:
    """What the SuperNode wrapper does to Flower's module: its SuperExec starts through
    this module with the pipe's read end, and a stored message (a run id) writes one
    byte; an empty pull writes none."""

    class Loop:
        subprocess = None

        @staticmethod
        def _pull_and_store_message(result: object) -> object:
            return result

    waker = superexec_wakeup.wake_supernode_superexec(Loop)
    assert waker.fd is None  # no SuperExec yet
    started = Loop.subprocess.Popen(  # type: ignore[attr-defined]
        ["flower-superexec", "--help"], stdout=subprocess.PIPE, text=True
    )
    try:
        cmdline = psutil.Process(started.pid).cmdline()
        assert cmdline[1:5] == ["-m", MODULE, "superexec", "--wake-fd"]
        out, _ = started.communicate(timeout=60)
        assert started.returncode == 0 and "--runtime-api-address" in out
    finally:
        if started.poll() is None:
            started.kill()
    assert waker.fd is not None  # the pipe's write end
    assert Loop._pull_and_store_message(None) is None and waker.fd is not None
    assert Loop._pull_and_store_message(7) == 7  # the SuperExec is gone: no error
    assert waker.fd is None
