"""Start a test's slow end-to-end run early, beside the module's other tests.

An end-to-end run spends much of its time waiting (process start-up, Flower's
polls, a node's heartbeat) and uses under one core on average, so on a 2-core
machine two independent federations side by side take less than one after the
other (how much less depends on what else the machine runs). A module lists the runs
that its tests will want; each one whose test is selected starts in a thread
when the module's first test starts, and its test then takes the result,
waiting if it is not done. The test's assertions are unchanged and stay in the
test; a run that failed raises there. A run whose test is not selected never
starts; a test whose run was not started ahead runs it itself, as do all of them
with ``PRIVFED_TESTS_SEQUENTIAL=1``. Only for modules whose tests watch their own
scripts' process trees: a test that checks every process under pytest (the
in-process deployments of test_deployment.py) would see, and stop, a run ahead.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from simulations.deployment.certificates import default_ca_dir, ensure_ca
from simulations.launch.processes import stop_processes
from tests.helpers.process_watch import STARTED_BY_THREAD

Run = Callable[[Path], Any]
# Set to 1 to start nothing ahead: every run then starts in its own test, in order.
SEQUENTIAL_ENV = "PRIVFED_TESTS_SEQUENTIAL"


class RunsAhead:
    """Runs started ahead of their tests, by test name."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._started: dict[str, Future[Any]] = {}
        self._threads: dict[str, int] = {}

    def start(self, test: str, run: Run, folder: Path) -> None:
        def tracked() -> Any:
            self._threads[test] = threading.get_ident()
            return run(folder)

        self._started[test] = self._pool.submit(tracked)

    def abandon(self) -> None:
        """Kill the scripts of every run that no test took (the session was
        interrupted or stopped early), so that waiting for them is short."""
        for test, started in self._started.items():
            if started.done() or test not in self._threads:
                continue
            for script in STARTED_BY_THREAD.get(self._threads[test], []):
                try:
                    tree = psutil.Process(script.pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    continue
                if script.poll() is None:
                    stop_processes([psutil.Process(script.pid), *tree], grace=5.0)

    def result(self, test: str, run: Run, folder: Path) -> Any:
        """The run started for ``test`` (waited for), else ``run(folder)`` now."""
        started = self._started.pop(test, None)
        return run(folder) if started is None else started.result()


@contextmanager
def runs_ahead(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    runs: dict[str, Run],
) -> Iterator[RunsAhead]:
    """Start ``runs[test]`` for each selected ``test`` of this module, each in a
    temporary folder of its own; wait for them all when the module ends."""
    module = request.node.path  # type: ignore[attr-defined]
    selected = {item.name for item in request.session.items if item.path == module}
    wanted = [name for name in runs if name in selected]
    if os.environ.get(SEQUENTIAL_ENV) == "1":
        wanted = []  # each test runs its own run when it comes (A/B timing, debugging)
    # Every run signs with the session's CA: make it once, before they race for it.
    ensure_ca(default_ca_dir())
    with ThreadPoolExecutor(max(len(wanted), 1), thread_name_prefix="run-ahead") as pool:
        ahead = RunsAhead(pool)
        for name in wanted:
            ahead.start(name, runs[name], tmp_path_factory.mktemp(name[:30]))
        try:
            yield ahead
        finally:
            ahead.abandon()
