"""ClientApp worker processes forked before the simulation process has any thread.

A Ray actor is a fresh Python process: about 3.3 CPU-s and 3 s of importing Ray,
Flower and torch before it trains, plus the Ray head's own processes, on every run.
The process engine instead forks its workers from ``flwr-simulation`` at its very
start, once torch and Flower are imported and before Flower starts its heartbeat,
log and ServerApp threads (forking a process that has threads can copy a lock some
other thread held). Each worker waits on a pipe; once the run's app is known it
loads the ClientApp from the run's FAB with Flower's own loader, then runs one
message at a time, as an actor does (:class:`WorkerHandle`).

A worker's standard output and error go back to the simulation process, line by
line, through its ``sys.stdout`` (what Flower uploads as the run's log), as Ray's
``log_to_driver`` does for an actor. A worker exits with its parent
(``PR_SET_PDEATHSIG``) or when its pipe closes.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from simulations.launch.forked import die_with_parent, fresh_random_state, name_process

WORKER_NAME = "privfed-worker"  # what `ps` shows for a worker
STOP_TIMEOUT_S = 5.0  # for a worker told to stop to exit before it is killed
OUTPUT_PREFIX = "(ClientApp worker pid={pid}) "


@dataclass(frozen=True)
class AppRef:
    """Where a worker loads the run's ClientApp from: Flower's loader's arguments."""

    app_dir: str
    client_app_attr: str
    fab_id: str
    fab_version: str
    fab_hash: str


class WorkerError(Exception):
    """A worker's ClientApp failed; ``stage`` is ``load`` or ``message``."""

    def __init__(self, stage: str, text: str) -> None:
        super().__init__(text)
        self.stage = stage


class _Pickler(pickle.Pickler):
    """Pickle with memoryviews as copies: Flower caches an array's chunks as views of
    its bytes, which plain pickle refuses (Ray's serializer copies them too)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, memoryview):
            return memoryview, (obj.tobytes(),)
        return NotImplemented


def send(conn: Connection, value: Any) -> None:
    """Pickle ``value`` (memoryviews included) down ``conn``."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    conn.send_bytes(buffer.getbuffer())


def receive(conn: Connection) -> Any:
    """What :func:`send` sent; ``EOFError`` once the other end is closed."""
    return pickle.loads(conn.recv_bytes())


def _load_client_app(ref: AppRef) -> Any:
    from flwr.clientapp.utils import get_load_client_app_fn

    load = get_load_client_app_fn(
        default_app_ref=ref.client_app_attr, app_path=ref.app_dir, multi_app=False
    )
    return load(ref.fab_id, ref.fab_version, ref.fab_hash)


def _failure(stage: str, exc: BaseException) -> tuple[str, str, str]:
    text = f"{exc}\n{''.join(traceback.format_exception(exc))}"
    return ("error", stage, text)


def _serve(conn: Connection, inherited: list[Connection], output: int, parent: int) -> None:
    """A worker's life: wait for the app, load it, answer messages until told to stop."""
    die_with_parent(parent, signal.SIGKILL)
    name_process(WORKER_NAME)
    for other in inherited:  # the simulation process's ends: EOF once it closes them
        other.close()
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    fresh_random_state()
    try:
        request = receive(conn)
    except EOFError:
        return
    if request[0] != "load":
        return
    try:
        app = _load_client_app(request[1])
    except Exception as exc:  # noqa: BLE001 - reported to the backend, which raises it
        send(conn, _failure("load", exc))
        return
    send(conn, ("ready",))
    while True:
        try:
            request = receive(conn)
        except EOFError:
            return
        if request[0] != "message":
            return
        _, message, context = request
        try:
            reply = app(message=message, context=context)
        except Exception as exc:  # noqa: BLE001 - as Flower's Ray actor: reported back
            send(conn, _failure("message", exc))
        else:
            send(conn, ("ok", reply, context))
        sys.stdout.flush()
        sys.stderr.flush()


def _forward(read_fd: int, pid: int) -> None:
    """Copy a worker's output into this process's current ``sys.stdout``, a line at a
    time (Flower replaces it later with a writer that also uploads the run's log)."""
    prefix = OUTPUT_PREFIX.format(pid=pid)
    with os.fdopen(read_fd, "r", errors="replace") as lines:
        for line in lines:
            try:
                sys.stdout.write(prefix + line)
                sys.stdout.flush()
            except (OSError, ValueError):
                return


class WorkerHandle:
    """The simulation process's end of one forked worker."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("fork")
        self.conn, child_conn = context.Pipe()
        self._read_fd, write_fd = os.pipe()
        inherited = [h.conn for h in FORKED] + [self.conn]
        self.process = context.Process(
            target=_serve,
            args=(child_conn, inherited, write_fd, os.getpid()),
            name="privfed-clientapp-worker",
            daemon=True,  # terminated at the simulation process's exit
        )
        self.process.start()
        child_conn.close()
        os.close(write_fd)

    def forward_output(self) -> None:
        """Start copying its output (a thread: only once every worker is forked)."""
        threading.Thread(
            target=_forward, args=(self._read_fd, self.pid), daemon=True
        ).start()

    @property
    def pid(self) -> int:
        """The worker's PID."""
        assert self.process.pid is not None
        return self.process.pid

    def _receive(self) -> tuple[Any, ...]:
        try:
            return receive(self.conn)  # type: ignore[no-any-return]
        except (EOFError, OSError):
            self.process.join(timeout=STOP_TIMEOUT_S)
            raise RuntimeError(
                f"ClientApp worker {self.pid} exited (code {self.process.exitcode})"
            ) from None

    def load(self, ref: AppRef) -> None:
        """Load the run's ClientApp; raise :class:`WorkerError` if it fails."""
        send(self.conn, ("load", ref))
        reply = self._receive()
        if reply[0] == "error":
            raise WorkerError(reply[1], reply[2])

    def run(self, message: Any, context: Any) -> tuple[Any, Any]:
        """One message through the ClientApp: the reply and the updated context."""
        send(self.conn, ("message", message, context))
        reply = self._receive()
        if reply[0] == "error":
            raise WorkerError(reply[1], reply[2])
        return reply[1], reply[2]

    def stop(self) -> None:
        """Tell it to stop; kill it if it does not exit in time."""
        try:
            send(self.conn, ("stop",))
        except OSError:
            pass
        self.conn.close()
        self.process.join(timeout=STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=STOP_TIMEOUT_S)


# Forked by simulations.engine.flwr_simulation before Flower runs; taken by the backend.
FORKED: list[WorkerHandle] = []


def fork_workers(count: int) -> None:
    """Fork ``count`` workers now (the process must have no other thread yet)."""
    if threading.active_count() != 1:
        raise RuntimeError(
            f"ClientApp workers must be forked before any thread starts; "
            f"{threading.active_count()} threads run"
        )
    for _ in range(count):
        FORKED.append(WorkerHandle())
    for handle in FORKED:
        handle.forward_output()


def keep_workers(count: int) -> None:
    """Stop the workers beyond the first ``count`` (a run with fewer nodes)."""
    while len(FORKED) > max(count, 1):
        FORKED.pop().stop()
