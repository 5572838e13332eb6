"""SuperExecs forked from their SuperNode or SuperLink (launch/superexec_fork.py).

Each probe is a fresh single-threaded Python process, as the wrappers are when they
fork: pytest's own process has threads, and then no fork is made (tested too). The
end-to-end tests check that every SuperExec of a simulation and a deployment was a
fork (its process name) and that every run and message was picked up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import psutil
import pytest

from simulations.launch.processes import wait_gone
from simulations.launch.superexec_fork import PROCESS_NAME, ForkedProcess, fork_superexec
from simulations.launch.superexec_wakeup import MODULE, is_superexec


def _probe(code: str, timeout: float = 60) -> tuple[dict, str]:
    """Run ``code`` in a fresh interpreter; its last stdout line is JSON."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


def _gone(pid: int, timeout: float = 10) -> bool:
    try:
        return not wait_gone([psutil.Process(pid)], timeout)
    except psutil.NoSuchProcess:
        return True


# What the SuperNode wrapper patches in Flower's node loop, as a probe's stand-in.
NODE_LOOP = f"""
from {MODULE} import wake_supernode_superexec

class Loop:
    subprocess = None
    @staticmethod
    def _pull_and_store_message(result):
        return result
"""


def test_the_supernodes_superexec_is_its_fork_with_the_entry_points_exit_code() -> None:
    """Flower's ``Popen(["flower-superexec", ...])`` in a wrapped SuperNode runs
    Flower's SuperExec entry point in the fork made when the node was wrapped; its
    exit code is the entry point's, and its wake-up pipe is the node's."""
    result, out = _probe(
        NODE_LOOP
        + textwrap.dedent(
            """
        import json
        waker = wake_supernode_superexec(Loop)
        fork = Loop.subprocess.fork
        started = Loop.subprocess.Popen(["flower-superexec", "--help"])
        code = started.wait(timeout=60)
        print(json.dumps({"forked": fork.pid, "pid": started.pid, "code": code,
                          "type": type(started).__name__, "woken": waker.fd is not None}))
        """
        )
    )
    assert result["type"] == "ForkedProcess" and result["pid"] == result["forked"]
    assert result["code"] == 0 and "--runtime-api-address" in out  # Flower's --help
    assert result["woken"]  # the fork's wake-up pipe is the node's waker now


def test_a_started_fork_is_named_parented_and_stopped_like_a_process() -> None:
    """A running fork: its name, parent, session (the SuperLink asks for a new one),
    and the environment and folder of the moment it was started, not of the fork,
    without the parent's other open files; ``wait`` times out while it runs;
    ``terminate`` stops it."""
    result, _ = _probe(
        """
        import json, os, subprocess, tempfile, time, psutil
        from simulations.launch.superexec_fork import fork_superexec

        def run(wake_fd, args):
            with open(args[0], "w") as fh:
                json.dump({"env": os.environ.get("PROBE_LATE"), "cwd": os.getcwd(),
                           "open": [os.path.realpath(f"/proc/self/fd/{fd}")
                                   for fd in os.listdir("/proc/self/fd")],
                            "args": args}, fh)
            time.sleep(60)

        extra, extra_path = tempfile.mkstemp()  # open when it forks, not after
        fork = fork_superexec(run)
        os.environ["PROBE_LATE"] = "1"
        os.chdir(tempfile.mkdtemp())
        report = os.path.join(os.getcwd(), "report-%d.json" % os.getpid())
        started = fork.start(["flower-superexec", report, "--x"], new_session=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(report) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        proc = psutil.Process(started.pid)
        seen = {"name": proc.name(), "ppid": proc.ppid(), "me": os.getpid(),
                 "sid": os.getsid(started.pid), "cmdline": proc.cmdline(),
                 "report": json.load(open(report))}
        try:
            started.wait(timeout=0.2)
            seen["timed_out"] = False
        except subprocess.TimeoutExpired:
            seen["timed_out"] = True
        started.terminate()
        seen["code"] = started.wait(timeout=10)
        os.remove(report)
        seen["here"], seen["extra"] = os.getcwd(), os.path.realpath(extra_path)
        os.remove(extra_path)
        print(json.dumps(seen))
        """
    )
    assert result["name"] == PROCESS_NAME and result["ppid"] == result["me"]
    assert result["sid"] != os.getsid(0)  # its own session, as start_new_session
    assert is_superexec(result["cmdline"], result["name"])
    assert not is_superexec(result["cmdline"])  # its command line is its parent's
    assert result["report"]["env"] == "1" and result["report"]["args"][1:] == ["--x"]
    assert result["report"]["cwd"] == result["here"]
    assert result["extra"] not in result["report"]["open"]  # closed, as Popen would
    assert result["timed_out"] and result["code"] == -15  # SIGTERM


def test_an_unused_fork_exits_with_its_parent_or_when_abandoned() -> None:
    """A fork never asked for a SuperExec leaves nothing behind: abandoned (a start
    with arguments a fork cannot honour, here its streams), or its parent gone."""
    result, _ = _probe(
        NODE_LOOP
        + textwrap.dedent(
            """
        import json, subprocess
        from simulations.launch.superexec_fork import fork_superexec
        wake_supernode_superexec(Loop)
        abandoned = Loop.subprocess.fork.pid
        cold = Loop.subprocess.Popen(
            ["flower-superexec", "--help"], stdout=subprocess.PIPE, text=True)
        out, _ = cold.communicate(timeout=60)
        orphan = fork_superexec(lambda fd, args: None)
        print(json.dumps({"abandoned": abandoned, "cold": cold.args,
                          "orphan": orphan.pid, "help": "--runtime-api-address" in out}))
        """
        )
    )
    assert result["cold"][1:4] == ["-m", MODULE, "superexec"] and result["help"]
    for pid in (result["abandoned"], result["orphan"]):
        assert _gone(pid), pid


def test_no_fork_from_a_process_with_threads() -> None:
    """A process with another thread (pytest's here; a SuperNode once Flower started
    its servers) is not forked: the SuperExec starts cold."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert fork_superexec(lambda fd, args: None) is None
    finally:
        stop.set()
        thread.join()


def test_the_handle_waits_with_a_timeout_and_reports_an_unknown_child() -> None:
    """``wait`` raises ``TimeoutExpired`` while the child runs and returns its code;
    a PID that is not a child reads as exited (-1) and is never signalled."""
    proc = subprocess.Popen(["sleep", "30"])
    handle = ForkedProcess(proc.pid, ["sleep", "30"])
    with pytest.raises(subprocess.TimeoutExpired):
        handle.wait(timeout=0.1)
    handle.kill()
    assert handle.wait(timeout=10) == -9 and handle.poll() == -9
    stranger = ForkedProcess(os.getpid(), ["x"])  # not a child: waitpid refuses
    assert stranger.poll() == -1
    stranger.terminate()  # treated as exited: this process is not signalled


def test_a_started_fork_dies_with_its_parent() -> None:
    """A SuperExec whose node exits (here abruptly) is gone at once, whatever it was
    doing (here sleeping, as Flower's connection retries do)."""
    result, _ = _probe(
        """
        import json, os, sys, time
        from simulations.launch.superexec_fork import fork_superexec

        fork = fork_superexec(lambda wake_fd, args: time.sleep(120))
        started = fork.start(["flower-superexec"])
        time.sleep(0.3)
        print(json.dumps({"pid": started.pid}), flush=True)
        os._exit(0)
        """
    )
    assert _gone(result["pid"], timeout=5)
