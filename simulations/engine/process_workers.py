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
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import threadpoolctl

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


def dumps(value: Any) -> bytes:
    """``value`` pickled, memoryviews included."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


def send(conn: Connection, value: Any) -> None:
    """Pickle ``value`` (memoryviews included) down ``conn``."""
    conn.send_bytes(dumps(value))


def receive(conn: Connection) -> Any:
    """What :func:`send` sent; ``EOFError`` once the other end is closed."""
    return pickle.loads(conn.recv_bytes())


def _load_client_app(ref: AppRef) -> Any:
    from flwr.clientapp.utils import get_load_client_app_fn

    load = get_load_client_app_fn(
        default_app_ref=ref.client_app_attr, app_path=ref.app_dir, multi_app=False
    )
    return load(ref.fab_id, ref.fab_version, ref.fab_hash)


def _serve(
    conn: Connection,
    inherited: list[Connection],
    inherited_fds: list[int],
    output: int,
    parent: int,
    threads: int,
) -> None:
    """A worker's life: wait for the app, load it, answer messages until told to stop."""
    die_with_parent(parent, signal.SIGKILL)
    name_process(WORKER_NAME)
    for other in inherited:  # the simulation process's ends: EOF once it closes them
        other.close()
    for fd in inherited_fds:  # other workers' output pipes: theirs to drain, not ours
        os.close(fd)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    del sys.argv[1:]  # flwr-simulation's arguments hold its token for the SuperLink
    fresh_random_state()
    # as Ray sets OMP_NUM_THREADS to an actor's CPUs: BLAS and OpenMP pools sized to
    # this worker's share of the machine, not to every core
    threadpoolctl.threadpool_limits(threads)
    try:
        request = receive(conn)
    except EOFError:
        return
    if request[0] != "load":
        return
    try:
        app = _load_client_app(request[1])
    except Exception as exc:  # noqa: BLE001 - reported to the backend, which drops us
        traceback.print_exc()
        send(conn, ("error", "load", f"{type(exc).__name__}: {exc}"))
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
            outcome: tuple[Any, ...] = ("ok", reply, context)
            payload = dumps(outcome)  # a reply that cannot be sent fails as a message
        except Exception as exc:  # noqa: BLE001 - as Flower's Ray actor: reported back
            traceback.print_exc()  # into the run's log; the ServerApp gets str(exc)
            payload = dumps(("error", "message", str(exc)))
        conn.send_bytes(payload)
        sys.stdout.flush()
        sys.stderr.flush()


def _forward(read_fd: int, pid: int) -> None:
    """Copy a worker's output into this process's current ``sys.stdout``, a line at a
    time (Flower replaces it later with a writer that also uploads the run's log).
    Once that fails, go on reading and dropping: a pipe left full would block the
    worker in its next write."""
    prefix = OUTPUT_PREFIX.format(pid=pid)
    copying = True
    with os.fdopen(read_fd, "r", errors="replace") as lines:
        for line in lines:
            if not copying:
                continue
            try:
                sys.stdout.write(prefix + line)
                sys.stdout.flush()
            except (OSError, ValueError):
                copying = False


class WorkerGone(RuntimeError):
    """The worker process exited; its message, if any, is lost."""


class WorkerHandle:
    """The simulation process's end of one forked worker."""

    def __init__(self, threads: int) -> None:
        context = multiprocessing.get_context("fork")
        self.conn, child_conn = context.Pipe()
        self._read_fd, write_fd = os.pipe()
        inherited = [h.conn for h in FORKED] + [self.conn]
        inherited_fds = [h._read_fd for h in FORKED] + [self._read_fd]
        self.process = context.Process(
            target=_serve,
            args=(child_conn, inherited, inherited_fds, write_fd, os.getpid(), threads),
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

    def alive(self) -> bool:
        """Whether the worker process still runs."""
        return self.process.is_alive()

    def _gone(self) -> WorkerGone:
        self.process.join(timeout=STOP_TIMEOUT_S)
        code = self.process.exitcode
        return WorkerGone(f"ClientApp worker {self.pid} exited (code {code})")

    def _exchange(self, request: tuple[Any, ...]) -> tuple[Any, ...]:
        try:
            send(self.conn, request)
            reply: tuple[Any, ...] = receive(self.conn)
        except (EOFError, OSError):
            raise self._gone() from None
        if reply[0] == "error":
            raise WorkerError(reply[1], reply[2])
        return reply

    def load(self, ref: AppRef) -> None:
        """Load the run's ClientApp; raise :class:`WorkerError` if it fails."""
        self._exchange(("load", ref))

    def run(self, message: Any, context: Any) -> tuple[Any, Any]:
        """One message through the ClientApp: the reply and the updated context."""
        reply = self._exchange(("message", message, context))
        return reply[1], reply[2]

    def ask_to_stop(self) -> None:
        """Send it the stop request and close this end (it exits once it reads it, or
        at once if it waits for a message)."""
        try:
            send(self.conn, ("stop",))
        except OSError:
            pass
        self.conn.close()

    def wait_or_kill(self, deadline: float) -> None:
        """Wait for it to exit until ``deadline`` (monotonic), then kill it."""
        self.process.join(timeout=max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=STOP_TIMEOUT_S)


def stop_workers(workers: list[WorkerHandle]) -> None:
    """Stop them all against one deadline."""
    for worker in workers:
        worker.ask_to_stop()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for worker in workers:
        worker.wait_or_kill(deadline)


# Forked by simulations.engine.flwr_simulation before Flower runs; taken by the backend.
FORKED: list[WorkerHandle] = []


def fork_workers(count: int, threads: int = 1) -> None:
    """Fork ``count`` workers now, each to use ``threads`` threads. The process must
    have no other Python thread yet. (NumPy's OpenBLAS starts native threads when it
    is imported; it stops them around a fork itself, with ``pthread_atfork``.)"""
    if threading.active_count() != 1:
        raise RuntimeError(
            f"ClientApp workers must be forked before any thread starts; "
            f"{threading.active_count()} threads run"
        )
    for _ in range(count):
        FORKED.append(WorkerHandle(threads))
    for handle in FORKED:
        handle.forward_output()


def keep_workers(count: int) -> None:
    """Stop the workers beyond the first ``count`` (a run with fewer nodes)."""
    extra = FORKED[max(count, 1) :]
    del FORKED[max(count, 1) :]
    stop_workers(extra)
