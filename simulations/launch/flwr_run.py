"""A submitted ``flwr run --stream``: its output, its run ID, and ``flwr stop``.

The launchers and the sweep submit every run this way. The run's output goes to
a stream (the terminal, or a sweep point's log), and the run ID is read from
``flwr run``'s own "Successfully started run <id>" line. A run that has to end
early (Ctrl-C, SIGTERM, ``--timeout``, a process it needs died) is stopped with
``flwr stop <id>`` over the connection the run was submitted on, before any
process is torn down: the SuperLink marks the run stopped, a deployed ServerApp's
next call to it fails and the ServerApp writes its own summary, and a simulation
process is stopped while its SuperLink can still take its last report.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import psutil

from server.results.outcome import Outcome
from simulations.launch.output import StreamEnd, interrupted
from simulations.launch.processes import descendants, piped_process, stop_processes
from simulations.launch.warm_flwr import WarmFlwr

FLWR = Path(sys.executable).parent / "flwr"
# flwr run's line once the SuperLink has accepted the run (Flower 1.42).
RUN_STARTED = re.compile(r"Successfully started run (\d+)")
# The processes that run a ServerApp: deployed, and in a simulation.
SERVERAPP_PROGRAMS = ("flwr-serverapp", "flwr-simulation")
STOP_TIMEOUT_S = 30.0  # for `flwr stop` itself
SERVERAPP_START_S = 60.0  # for the SuperLink to start the run's ServerApp process
STREAM_EXIT_S = 10.0  # for `flwr run --stream` to end once the run is stopped
# For the run ID line after an early interrupt, while `flwr run` is still running:
# the run it submits must be stopped, and a loaded machine can take several seconds.
RUN_ID_WAIT_S = 30.0


class Interrupt:
    """An interrupt that one thread (the sweep's main thread) passes to the threads
    that follow runs: ``how`` names the signal once it came.

    It also counts the runs under way (:meth:`unless_set`), so that the main
    thread can wait for them to report (:meth:`wait_for_runs`) without relying on
    an executor's bookkeeping, which a signal landing inside a submission can leave
    without the thread it just started.
    """

    def __init__(self) -> None:
        self.how: str | None = None
        self._changed = threading.Condition()
        self._running = 0

    def set(self, how: str) -> None:
        """Record the interrupt (the first one counts)."""
        with self._changed:
            if self.how is None:
                self.how = how

    @contextmanager
    def unless_set(self) -> Iterator[bool]:
        """Yield whether to go on (no interrupt yet); a run that goes on is counted
        until the block ends, and the check and the count are one step."""
        with self._changed:
            go = self.how is None
            self._running += go
        try:
            yield go
        finally:
            if go:
                with self._changed:
                    self._running -= 1
                    self._changed.notify_all()

    def wait_for_runs(self) -> None:
        """Block until no run counted by :meth:`unless_set` is under way (polling,
        so a second signal still reaches the main thread)."""
        with self._changed:
            while self._running:
                self._changed.wait(timeout=0.5)


def serverapp_processes() -> list[psutil.Process]:
    """This process's descendants that run a ServerApp (see SERVERAPP_PROGRAMS)."""
    found = []
    for proc in descendants():
        try:
            argv = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if any(Path(a).name in SERVERAPP_PROGRAMS for a in argv[:2]):
            found.append(proc)
    return found


class SubmittedRun:
    """One ``flwr run --stream`` process, its output copied to ``out`` as it comes;
    started now, or handed its command line if ``warm`` (see
    :mod:`simulations.launch.warm_flwr`).

    ``serverapp`` is the process the SuperLink started for this run's ServerApp
    (``flwr-serverapp``, or ``flwr-simulation`` with the ServerApp in a thread),
    found in the background as the one that appeared after the submission:
    submissions from several threads (a sweep's ``--jobs``) take turns until
    theirs is found, so stopping one run never touches another's.
    """

    _launching = threading.Lock()

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: Path,
        connection: str,
        out: TextIO | None = None,
        warm: WarmFlwr | None = None,
    ) -> None:
        self.env = dict(env)
        self.cwd = cwd
        self.connection = connection
        self.run_id: int | None = None
        self._seen_id = threading.Event()
        self.out = out or sys.stdout
        self.serverapp: psutil.Process | None = None
        SubmittedRun._launching.acquire()  # released once this run's is found
        try:
            before = {p.pid for p in serverapp_processes()}
            if warm is not None:  # `flwr` started ahead, same environment and folder
                if Path(argv[0]) != FLWR or warm.env != self.env or warm.cwd != cwd:
                    warm.release()
                    raise ValueError("a warm flwr runs only `flwr` in its own env and cwd")
                self.popen = warm.go(argv[1:])
            else:
                self.popen = piped_process(argv, self.env, cwd, subprocess.DEVNULL)
        except BaseException:
            SubmittedRun._launching.release()
            raise
        self._finder = threading.Thread(
            target=self._find_serverapp, args=(before,), daemon=True
        )
        self._finder.start()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _find_serverapp(self, before: set[int]) -> None:
        """Note the ServerApp process that appears after the submission, if any."""
        try:
            deadline = time.monotonic() + SERVERAPP_START_S
            while time.monotonic() < deadline and self.popen.poll() is None:
                new = [p for p in serverapp_processes() if p.pid not in before]
                if new:
                    self.serverapp = new[0]
                    return
                time.sleep(0.1)
        finally:
            SubmittedRun._launching.release()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if self.run_id is None and (found := RUN_STARTED.search(line)):
                self.run_id = int(found.group(1))
                self._seen_id.set()
            self.out.write(line)
            self.out.flush()

    def stream(
        self,
        deadline: float,
        check: Callable[[], str | None] | None = None,
        interrupt: Interrupt | None = None,
    ) -> StreamEnd:
        """Wait until ``flwr run`` exits, the deadline (monotonic) passes, ``check``
        (called about once a second) reports a problem, or ``interrupt`` is set."""
        while True:
            try:
                code = self.popen.wait(timeout=1.0)
                self._reader.join(timeout=5)
                return StreamEnd(None, f"flwr run exited with code {code}")
            except subprocess.TimeoutExpired:
                pass
            if interrupt is not None and interrupt.how is not None:
                return interrupted(KeyboardInterrupt(interrupt.how), self.out)
            if time.monotonic() > deadline:
                self._say("time limit reached; stopping the run")
                return StreamEnd(Outcome.TIMED_OUT, "the launcher's --timeout passed")
            problem = check() if check is not None else None
            if problem:
                self._say(f"stopping the run: {problem}")
                return StreamEnd(Outcome.FAILED, problem)

    def stop(
        self,
        serverapp_grace: float = 0.0,
        kill_grace: float = 10.0,
        serverapp_done: Callable[[], bool] | None = None,
    ) -> None:
        """``flwr stop`` the run, then make sure its ServerApp process has ended.

        Waits up to ``serverapp_grace`` s for the ServerApp to finish by itself:
        its process exits, or ``serverapp_done()`` says it is done (a deployed
        ServerApp writes its summary within seconds of the stop, and its process
        may then hang in Flower's exit). Then stops it and what it started (a
        simulation's private Ray instance) by PID: SIGTERM, and SIGKILL after
        ``kill_grace`` s. So nothing writes to the results folder once this
        returns. Prints what it did.
        """
        waited_until = time.monotonic() + RUN_ID_WAIT_S
        while self.run_id is None and self.popen.poll() is None:
            if self._seen_id.wait(0.2) or time.monotonic() > waited_until:
                break
        if self.run_id is None:  # it may have exited with the line not read yet
            self._seen_id.wait(1.0)
        if self.run_id is None:
            self._say("no run ID was printed yet, so there is no run to stop")
        else:
            self._flwr_stop(self.run_id)
        deadline = time.monotonic() + serverapp_grace
        try:
            self.popen.wait(timeout=STREAM_EXIT_S)
        except subprocess.TimeoutExpired:
            pass
        self._finder.join(timeout=SERVERAPP_START_S)  # it gives up once flwr run exits
        if self.serverapp is None:
            return
        while time.monotonic() < deadline and self.serverapp.is_running():
            if serverapp_done is not None and serverapp_done():
                break
            time.sleep(0.2)
        else:
            if serverapp_grace > 0 and self.serverapp.is_running():
                self._say(
                    f"the ServerApp did not finish within {serverapp_grace:.0f} s of "
                    "the stop; stopping its process"
                )
        try:
            tree = [self.serverapp, *self.serverapp.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        stop_processes(tree, grace=kill_grace)

    def _flwr_stop(self, run_id: int) -> None:
        try:
            done = subprocess.run(
                [str(FLWR), "stop", str(run_id), self.connection],
                env=self.env,
                cwd=self.cwd,
                capture_output=True,
                text=True,
                timeout=STOP_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
                process_group=0,
            )
        except subprocess.TimeoutExpired:
            self._say(f"flwr stop {run_id} did not answer in {STOP_TIMEOUT_S:.0f} s")
            return
        if done.returncode == 0:
            self._say(f"run {run_id} stopped (flwr stop)")
        else:
            text = (done.stdout + done.stderr).strip().splitlines()
            self._say(
                f"flwr stop {run_id} failed (exit {done.returncode}): "
                f"{text[-1] if text else 'no output'}"
            )

    def close(self) -> None:
        """End ``flwr run`` if it still runs, and finish copying its output."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        self._reader.join(timeout=5)

    def _say(self, text: str) -> None:
        self.out.write(f"[privfed] {text}\n")
        self.out.flush()


def follow_run(
    run: SubmittedRun,
    deadline: float,
    check: Callable[[], str | None] | None = None,
    interrupt: Interrupt | None = None,
    serverapp_grace: float = 0.0,
    kill_grace: float = 10.0,
    serverapp_done: Callable[[], bool] | None = None,
) -> StreamEnd:
    """Stream ``run`` to its end; one that must end early is stopped first.

    Ctrl-C or SIGTERM (a KeyboardInterrupt, see ``install_signal_handlers``), the
    deadline, ``check`` or ``interrupt`` end the stream; the run is then stopped
    with ``flwr stop`` (see :meth:`SubmittedRun.stop`) while every process still
    runs. A second interrupt while stopping goes to the caller, whose teardown
    stops everything by PID.
    """
    try:
        end = run.stream(deadline, check, interrupt)
    except KeyboardInterrupt as exc:
        end = interrupted(exc, run.out)
    try:
        if end.outcome is not None:
            run.stop(serverapp_grace, kill_grace, serverapp_done)
    finally:
        run.close()
    return end
