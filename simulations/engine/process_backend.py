"""Flower's simulation engine with ClientApps run by forked local processes, not Ray.

Flower's simulation runtime (``flwr/server/superlink/fleet/vce``) hands each message
to a :class:`~flwr.server.superlink.fleet.vce.backend.Backend`; Flower 1.42 ships
one, Ray's. This one runs the messages on the worker processes that
:mod:`simulations.engine.process_workers` forked when the simulation process
started: one message at a time per worker, as a Ray actor runs them, with the same
errors (a failing ClientApp is a ``ClientAppException`` with the exception's text,
its traceback in the run's log; a run whose workers cannot load the app fails with a
``LoadClientAppError``). Flower's message queues, node contexts, LinkState and
the ServerApp are untouched.

What it does not do that Ray does: spread workers over machines (use
``--engine ray --ray-address``), reserve GPUs, or restart a worker that died (the
message it ran fails, the others go to the workers left, and once none is left every
message fails). docs/simulation.md, "Engines".
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from logging import DEBUG, ERROR, WARNING
from typing import Any

from flwr.app.message import Context, Message
from flwr.clientapp.client_app import ClientApp, ClientAppException, LoadClientAppError
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig
from flwr.supercore import log

from simulations.engine.process_workers import (
    FORKED,
    AppRef,
    WorkerError,
    WorkerGone,
    WorkerHandle,
    stop_workers,
)

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
        self.lock = threading.Lock()
        log(DEBUG, "Process backend; config %s", backend_config)

    @property
    def num_workers(self) -> int:
        """How many messages run at once: one per worker."""
        return len(self.workers)

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        """Have every forked worker load the run's ClientApp (Flower loaded and
        checked it in this process already, through ``app_fn``). A worker that
        cannot is stopped, with its error in the log; none that can is an error."""
        if "app" not in APP:
            raise LoadClientAppError("the process backend was not given the run's app")
        ref = APP["app"]
        failed: list[str] = []
        for worker in FORKED:
            try:
                worker.load(ref)
            except (WorkerError, WorkerGone) as exc:
                log(ERROR, "ClientApp worker %i cannot run the app: %s", worker.pid, exc)
                failed.append(str(exc))
                stop_workers([worker])
                continue
            self.workers.append(worker)
            self.idle.put(worker)
        if not self.workers:
            raise LoadClientAppError(
                f"no ClientApp worker could load {ref.client_app_attr!r} from "
                f"{ref.app_dir}: {'; '.join(failed) or 'none was forked'}"
            )
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
            return worker.run(message, context)
        except WorkerError as exc:  # the ClientApp raised: as a Ray actor reports it
            raise ClientAppException(str(exc)) from None
        finally:
            self._give_back(worker)

    def _give_back(self, worker: WorkerHandle) -> None:
        if worker.alive():
            self.idle.put(worker)
            return
        with self.lock:
            if worker in self.workers:
                self.workers.remove(worker)
                log(WARNING, "ClientApp worker %i is gone; %i left", worker.pid,
                    len(self.workers))  # fmt: skip

    def _take(self) -> WorkerHandle:
        while True:
            try:
                worker = self.idle.get(timeout=TAKE_TIMEOUT_S)
            except queue.Empty:
                if not self.workers:
                    raise WorkerGone("every ClientApp worker has exited") from None
                continue
            if worker.alive():
                return worker
            self._give_back(worker)  # died while idle: dropped

    def terminate(self) -> None:
        """Stop every worker, against one deadline."""
        with self.lock:
            workers, self.workers = list(self.workers), []
        stop_workers(workers)


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
