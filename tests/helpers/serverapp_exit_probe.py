"""The ServerApp's ``main`` when Flower makes it exit, as after ``flwr stop``.

Run as ``python -m tests.helpers.serverapp_exit_probe RESULTS_DIR [--unarmed]``. The
grid's first call raises SIGINT in this process, as Flower's HTTP retry does on a
401 (the run's token revoked), and waits as it does. Flower's signal handlers are
installed as ``flwr-serverapp`` installs them, with an exit handler that takes 8 s,
as pushing the logs and the task output did on a busy machine: Flower's 5 s
force-exit timer ends the process before ``main``'s ``except`` can run.
``--unarmed`` does the same with :class:`ExitSummary` made inert, to show that
without it no summary is written.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from flwr.app import Context, RecordDict
from flwr.supercore.exit import register_signal_handlers

import server.app
from server.results import exit_summary
from simulations.launch.options import pyproject_defaults

# 3 s past Flower's FORCE_EXIT_TIMEOUT_SECONDS (5): a margin for a busy machine
SLOW_EXIT_S = 8.0


class RevokedGrid:
    """A grid whose run was stopped: Flower's client signals itself and waits."""

    def __getattr__(self, name: str) -> Any:
        def call(*_args: object, **_kwargs: object) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(SLOW_EXIT_S + 1)

        return call


def main(results: str, unarmed: bool) -> None:
    if unarmed:
        exit_summary.ExitSummary.arm = lambda self: None  # type: ignore[method-assign]
    register_signal_handlers(
        event_type=None,  # type: ignore[arg-type]
        exit_message="Task stopped by user.",
        exit_handlers=[lambda: time.sleep(SLOW_EXIT_S)],
    )
    config = {**pyproject_defaults(), "results-dir": results, "num-rounds": 3}
    context = Context(
        run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=config
    )
    server.app.main(RevokedGrid(), context)  # type: ignore[arg-type]
    print("main returned", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], "--unarmed" in sys.argv[2:])
