"""Flower's ``flwr`` command with its start-up paid ahead of the submission.

``flwr run`` spends about 0.8 s starting Python and importing Flower's CLI before it
builds and uploads the app, and a launcher knows long before it submits that it will:
while the SuperLink and the Ray head start, or while a sweep's previous point runs.
So it starts this module early (:class:`WarmFlwr`); the process imports the CLI and
waits. Given the command line on its standard input, it runs Flower's own CLI entry
point with it, exactly as the ``flwr`` console script does (``flwr.cli.app:app``).
Closed without a command line (the launcher was interrupted, or had no more
runs), it exits 0 having submitted nothing.

    python -m simulations.launch.warm_flwr    # then, on stdin: ["run", "app", ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

from simulations.launch.processes import piped_process

RELEASE_TIMEOUT_S = 10.0  # for a released process to exit


class WarmFlwr:
    """A started ``python -m simulations.launch.warm_flwr``, not yet told what to run.

    Its output is piped and it has a process group of its own
    (:func:`simulations.launch.processes.piped_process`), as a cold ``flwr run`` has.
    """

    def __init__(self, env: Mapping[str, str], cwd: Path) -> None:
        self.env = dict(env)
        self.cwd = cwd
        # -P: nothing of the working folder on sys.path, as for the console script
        argv = [sys.executable, "-P", "-m", "simulations.launch.warm_flwr"]
        self.popen = piped_process(argv, self.env, cwd, subprocess.PIPE)
        self.used = False

    def go(self, args: Sequence[str]) -> subprocess.Popen[str]:
        """Run ``flwr <args>`` in the process; return the process."""
        assert self.popen.stdin is not None
        self.used = True
        try:
            self.popen.stdin.write(json.dumps(list(args)) + "\n")
            self.popen.stdin.close()
        except BrokenPipeError:
            pass  # it died before: its exit code and output say why
        return self.popen

    def release(self) -> None:
        """End it unused (nothing is submitted); nothing to do once used."""
        if self.used:
            return
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            try:
                self.popen.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.popen.wait(timeout=RELEASE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


class WarmFlwrPool:
    """Warm ``flwr`` processes for a known number of submissions: ``spare`` wait
    ready at any time, and no more are started than submissions remain."""

    def __init__(
        self, env: Mapping[str, str], cwd: Path, submissions: int, spare: int = 1
    ) -> None:
        self.env = dict(env)
        self.cwd = cwd
        self.spare = spare
        self._left = submissions  # submissions that have not taken a process yet
        self._ready: deque[WarmFlwr] = deque()
        self._lock = threading.Lock()
        self._top_up()

    def _top_up(self) -> None:
        while len(self._ready) < min(self.spare, self._left):
            self._ready.append(WarmFlwr(self.env, self.cwd))

    def take(self) -> WarmFlwr:
        """A ready process (one started now if none is), and a next one started."""
        with self._lock:
            warm = self._ready.popleft() if self._ready else WarmFlwr(self.env, self.cwd)
            self._left = max(self._left - 1, 0)
            self._top_up()
            return warm

    def close(self) -> None:
        """Release every process not taken."""
        with self._lock:
            while self._ready:
                self._ready.popleft().release()
            self._left = 0


def main() -> int:
    """Import Flower's CLI, wait for a command line, run it."""
    from flwr.cli.app import app  # the `flwr` console script's entry point

    line = sys.stdin.readline()
    if not line.strip():
        return 0  # released: nothing to submit
    args = json.loads(line)
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        print(f"warm_flwr: expected a JSON list of strings, got {line!r}", file=sys.stderr)
        return 2
    sys.argv = ["flwr", *args]
    return app()


if __name__ == "__main__":
    sys.exit(main())
