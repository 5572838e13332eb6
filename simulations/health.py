"""Readiness through the standard gRPC health service (``grpc.health.v1``)."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from simulations.processes import ManagedProcess


def is_serving(address: str, timeout: float = 1.0) -> bool:
    """True when the health service at ``address`` answers SERVING."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_serving(address: str, proc: ManagedProcess, timeout: float) -> None:
    """Block until ``proc``'s health service is SERVING; fail early if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running():
            raise RuntimeError(
                f"{proc.name} exited with code {proc.popen.returncode} before serving; "
                f"its log ({proc.log_path}) ends with:\n{proc.log_tail()}"
            )
        if is_serving(address):
            return
        time.sleep(0.2)
    raise TimeoutError(
        f"{proc.name} not SERVING on {address} after {timeout:.0f} s; its log ends "
        f"with:\n{proc.log_tail()}"
    )
