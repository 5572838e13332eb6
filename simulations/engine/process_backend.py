"""Flower's simulation engine with ClientApps run by forked local processes, not Ray.

Flower's simulation runtime (``flwr/server/superlink/fleet/vce``) hands each message
to a :class:`~flwr.server.superlink.fleet.vce.backend.Backend`; Flower 1.42 ships
one, Ray's. This one runs the messages on the worker processes that
:mod:`simulations.engine.process_workers` forked when the simulation process
started: one message at a time per worker, as a Ray actor runs them, with the same
errors (a failing ClientApp is a ``ClientAppException``, one that cannot be loaded
a ``LoadClientAppError``). Flower's message queues, node contexts, LinkState and
the ServerApp are untouched.

What it does not do that Ray does: spread workers over machines (use
``--engine ray --ray-address``), reserve GPUs, or restart a worker that died (its
messages fail, and the ServerApp sees the errors). docs/simulation.md, "Engines".
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from logging import DEBUG, WARNING
from typing import Any

from flwr.app.message import Context, Message
from flwr.clientapp.client_app import ClientApp, ClientAppException, LoadClientAppError
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig
from flwr.supercore import log

from simulations.engine.process_workers import FORKED, AppRef, WorkerError, WorkerHandle

# The run's app, as Flower's start_vce was given it (simulations.engine.flwr_simulation
# records it before Flower builds the backend).
APP: dict[str, AppRef] = {}
# Flower's simulation engine asks a worker for each message it takes; none idle for
# this long means every worker died (their messages failed).
TAKE_TIMEOUT_S = 1.0


class ProcessBackend(Backend):
    """Runs each message on an idle forked worker; ``num_workers`` at once."""

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self.workers: list[WorkerHandle] = []
        self.idle: queue.Queue[WorkerHandle] = queue.Queue()
        log(DEBUG, "Process backend; config %s", backend_config)

    @property
    def num_workers(self) -> int:
        """How many messages run at once: one per worker."""
        return len(self.workers)

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        """Have every forked worker load the run's ClientApp (Flower loaded and
        checked it in this process already, through ``app_fn``)."""
        if "app" not in APP:
            raise LoadClientAppError("the process backend was not given the run's app")
        if not FORKED:
            raise RuntimeError("no ClientApp worker was forked for the process backend")
        ref = APP["app"]
        for worker in FORKED:
            try:
                worker.load(ref)
            except WorkerError as exc:
                raise LoadClientAppError(str(exc)) from None
            self.workers.append(worker)
            self.idle.put(worker)
        log(DEBUG, "Process backend: %i ClientApp workers", len(self.workers))

    def is_worker_idle(self) -> bool:
        """Whether a worker waits for a message."""
        return not self.idle.empty()

    def process_message(
        self, message: Message, context: Context
    ) -> tuple[Message, Context]:
        """Run ``message`` through the ClientApp on an idle worker."""
        worker = self._take()
        try:
            reply, updated = worker.run(message, context)
        except WorkerError as exc:
            self.idle.put(worker)
            if exc.stage == "load":
                raise LoadClientAppError(str(exc)) from None
            raise ClientAppException(str(exc)) from None
        except RuntimeError:
            log(WARNING, "ClientApp worker %i is gone; %i left", worker.pid,
                len(self.workers) - 1)  # fmt: skip
            self.workers.remove(worker)
            raise
        self.idle.put(worker)
        return reply, updated

    def _take(self) -> WorkerHandle:
        while True:
            try:
                return self.idle.get(timeout=TAKE_TIMEOUT_S)
            except queue.Empty:
                if not self.workers:
                    raise RuntimeError("every ClientApp worker has exited") from None

    def terminate(self) -> None:
        """Stop every worker."""
        for worker in self.workers:
            worker.stop()
        self.workers.clear()


def record_app(kwargs: dict[str, Any]) -> None:
    """Keep what Flower's ``start_vce`` was given to load the ClientApp."""
    run = kwargs["run"]
    APP["app"] = AppRef(
        app_dir=str(kwargs["app_dir"]),
        client_app_attr=str(kwargs.get("client_app_attr") or ""),
        fab_id=run.fab_id,
        fab_version=run.fab_version,
        fab_hash=run.fab_hash,
    )
