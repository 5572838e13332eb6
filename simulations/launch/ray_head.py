"""The launcher's private Ray head on 127.0.0.1, started beside its SuperLink.

Without an address, Flower's simulation process (``flwr-simulation``) starts Ray
itself inside ``ray.init()`` and stops it at the end: about 3 CPU-s and a few seconds
of every run, on the way to round 1 (the round loop waits for the simulated nodes to
say which clients they host, and they answer from Ray workers). A run instead starts
one head beside its SuperLink, and its Flower attaches to it through ``RAY_ADDRESS``,
as it attaches to a cluster of ``--ray-address``: launch to round 1 drops by about
1.4 s (BENCHMARKS.md, "Launch to round 1"). A sweep starts one head for all its
points: the whole sweep takes about 11 % less time (BENCHMARKS.md, "One private Ray
head for the whole sweep").

The head is the launcher's alone: its own GCS and client-server ports (Ray's
client server would otherwise take the fixed port 10001, and a second head on the
machine would fail), its own temp folder (``privfed-ray-*``, linked from the
launcher's folder, so that it does not become the cluster another program's
``ray.init()`` finds in ``/tmp/ray``), bound to 127.0.0.1
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), without Ray's dashboard or autoscaler
monitor, and stopped by PID with every process under it.
"""

from __future__ import annotations

import socket
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from simulations.launch.processes import ManagedProcess, free_port, wait_until

RAY_HEAD_LOG = "ray-head.log"
WORKER_NICENESS_ENV = "RAY_worker_niceness"  # Ray's setting; its default is 15
PRESTART_ENV = "RAY_prestart_worker_first_driver"  # Ray's setting; its default is 1
_READY_LINE = "Ray runtime started."  # what `ray start` prints once the node is up
# A head comes up in 3-5 s here; a loaded machine can take several times that.
STARTUP_TIMEOUT_S = 120.0
# On SIGTERM `ray start --block` stops its daemons one after another, about a second
# each (3.4 s in all here). The head keeps nothing that outlives it (its state is in
# memory, its folder is the launcher's), so what is left after a second is killed.
HEAD_STOP_GRACE_S = 1.0


@dataclass
class RayHead:
    """A ``ray start --head --block`` process and the address runs attach to."""

    process: ManagedProcess
    port: int
    cpus: int

    @property
    def address(self) -> str:
        """``127.0.0.1:<GCS port>``, what ``RAY_ADDRESS`` names."""
        return f"127.0.0.1:{self.port}"

    def describe(self) -> str:
        """What the log says of it."""
        return f"a private Ray head on {self.address} ({self.cpus} CPUs)"

    def wait_serving(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Return once the head's GCS accepts connections, the earliest a run may be
        submitted: a driver's ``ray.init`` then waits for the head's raylet to
        register (Ray polls for it), so the rest of the head's start overlaps the
        run's own start. Raise with its log if it died or timed out."""
        wait_until(
            lambda: _accepts(self.port),
            timeout,
            f"the private Ray head's GCS on {self.address} to serve",
            self.process,
        )

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Return once the head serves; raise with its log if it died or timed out."""
        wait_until(
            lambda: _READY_LINE in self.process.log_text(),
            timeout,
            f"the private Ray head on {self.address} to start",
            self.process,
        )


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def head_argv(port: int, client_port: int, cpus: int, temp_dir: Path) -> list[str]:
    """The ``ray start`` command line of a loopback-only head with ``cpus`` CPUs,
    its GCS on ``port`` and Ray's client server on ``client_port``."""
    if cpus < 1:
        raise ValueError(f"a Ray head needs at least one CPU, got {cpus}")
    return [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--ray-client-server-port", str(client_port),
        "--num-cpus", str(cpus), "--include-dashboard=false",
        # no autoscaler monitor: a fixed one-machine head scales nothing, and the
        # monitor is one more process importing Ray (about 0.8 CPU-s) on every run
        "--no-monitor",
        "--disable-usage-stats", "--temp-dir", str(temp_dir),
    ]  # fmt: skip


def head_env(env: Mapping[str, str]) -> dict[str, str]:
    """The head's environment: ``env`` without ``RAY_ADDRESS`` (it is the cluster),
    its workers at the niceness of every other process of the federation, and no
    workers started ahead of the first driver: Flower's driver asks for workers with
    its own environment (a ``runtime_env``), so Ray's ahead-of-time workers were never
    used and only took CPU from the start-up.

    Ray lowers its workers' priority to niceness 15 by default, so that they never
    starve its own daemons. Here the workers are the ClientApps, the work itself:
    beside three busy processes of niceness 0, a one-round sweep point took 225 s at
    niceness 15 and 13.1 s at 0 (the sweep of BENCHMARKS.md, "One private Ray head").
    """
    out = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    out[WORKER_NICENESS_ENV] = "0"
    out[PRESTART_ENV] = "0"
    return out


@contextmanager
def private_ray_head(
    env: Mapping[str, str], work_dir: Path, cpus: int
) -> Iterator[RayHead]:
    """Start the head without waiting for it (:meth:`RayHead.wait_serving` and
    :meth:`RayHead.wait_ready` do); stop it and everything under it on exit.

    Ray's sessions (logs and sockets) go to a short folder of their own in the
    system's temp folder, linked from ``work_dir/ray``: a Unix socket's path may
    not exceed 107 bytes, and Ray puts its sockets three folders below.
    """
    port, client_port = free_port(), free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="privfed-ray-"))
    (work_dir / "ray").symlink_to(temp_dir, target_is_directory=True)
    proc = ManagedProcess(
        "ray-head", head_argv(port, client_port, cpus, temp_dir), head_env(env),
        work_dir / RAY_HEAD_LOG, work_dir,
    )  # fmt: skip
    try:
        yield RayHead(proc, port, cpus)
    finally:
        proc.stop(grace=HEAD_STOP_GRACE_S)


@contextmanager
def ray_for_runs(
    env: dict[str, str], work_dir: Path, cluster: str | None, cpus: int
) -> Iterator[RayHead | None]:
    """The Ray every run of this launcher uses: the running cluster ``cluster``
    (``None`` here), else a private head of ``cpus`` CPUs whose address goes into
    ``env`` before any Flower process is started with it."""
    if cluster is not None:
        yield None
        return
    with private_ray_head(env, work_dir, cpus) as head:
        env["RAY_ADDRESS"] = head.address
        yield head
