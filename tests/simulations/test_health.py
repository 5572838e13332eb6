"""Readiness through the gRPC health protocol, against a local health server."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from simulations.deployment.health import is_serving, wait_serving
from simulations.launch.processes import ManagedProcess, free_port


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    """A grpc.health.v1 server on 127.0.0.1 whose status the test sets."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


def test_is_serving_follows_the_reported_status(
    health_server: tuple[str, health.HealthServicer],
) -> None:
    """SERVING is ready; NOT_SERVING and a closed port are not."""
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert not is_serving(address)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert is_serving(address)
    assert not is_serving(f"127.0.0.1:{free_port()}", timeout=0.5)


def test_wait_serving_fails_early_with_the_log_of_a_dead_process(tmp_path: Path) -> None:
    """A process that exits before serving is reported at once, with its log tail."""
    proc = ManagedProcess(
        "dies",
        [sys.executable, "-c", "print('bad flag: --nope'); raise SystemExit(3)"],
        {},
        tmp_path / "dies.log",
    )
    try:
        with pytest.raises(RuntimeError, match=r"(?s)code 3.*bad flag: --nope"):
            wait_serving(f"127.0.0.1:{free_port()}", proc, timeout=60)
    finally:
        proc.stop()


def test_wait_serving_times_out(tmp_path: Path) -> None:
    """A live process that never serves fails after the deadline, not never."""
    proc = ManagedProcess(
        "sleeper",
        [sys.executable, "-c", "print('started'); import time; time.sleep(60)"],
        {},
        tmp_path / "sleeper.log",
    )
    try:
        with pytest.raises(TimeoutError, match="SERVING"):
            wait_serving(f"127.0.0.1:{free_port()}", proc, timeout=1.5)
    finally:
        proc.stop(grace=1.0)
