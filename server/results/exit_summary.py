"""The ServerApp's summary when Flower makes it exit, written before Flower's deadline.

Why: in a deployment (``flwr-serverapp``), after ``flwr stop`` the ServerApp's next
call to the SuperLink is refused (401) and Flower raises SIGINT in its own process.
Its handler (``flwr_exit``) starts a 5 s timer that ends the process with
``os._exit``, runs Flower's own exit work (it pushes the logs and the task output),
and only then raises ``SystemExit`` in the ServerApp's code, whose ``except`` writes
``summary.json``. On a busy machine Flower's part took 3 s and the summary, started
with 2 s left, was never written.

Flower runs exit handlers registered with ``run_before_force_exit=True`` before it
starts that timer. :class:`ExitSummary` is one: it writes the summary of a run that
is being stopped, unless the ServerApp has already written its own final one. The
``except`` path still rewrites it with the exception (``SystemExit: 0``) if it gets
there in time; both writes are atomic, so a reader sees one summary or the other.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from flwr.supercore.exit import add_exit_handler

# What summary.json's stop_reason says when the handler, not the except path, wrote it.
FLOWER_EXIT_REASON = (
    "Flower is ending the ServerApp: its run was stopped (flwr stop) or the "
    "process got SIGINT, SIGTERM or SIGQUIT"
)


class ExitSummary:
    """Writes a stopped run's summary from Flower's exit, once, while armed."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self._write = write
        self.armed = False

    def arm(self) -> None:
        """From now on Flower's exit writes the summary (registered with Flower).

        Only where the ServerApp runs in the main thread (``flwr-serverapp``): there
        Flower's signal handler suspends it, so the rounds it recorded are all it
        will do. In a simulation it runs in a thread of its own, which goes on
        while Flower's main thread exits and writes its summary itself.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        self.armed = True
        add_exit_handler(self._on_exit, run_before_force_exit=True)

    def disarm(self) -> None:
        """The ServerApp writes its own summary now: the handler does nothing."""
        self.armed = False

    def _on_exit(self) -> None:
        if self.armed:
            self.armed = False
            self._write(FLOWER_EXIT_REASON)
