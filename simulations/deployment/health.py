"""Readiness through the standard gRPC health service (``grpc.health.v1``)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from simulations.launch.processes import ManagedProcess, wait_until

# Readiness probes go straight to loopback, never through an http_proxy from the env.
_CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


def is_serving(address: str, timeout: float = 1.0) -> bool:
    """True when the health service at ``address`` answers SERVING.

    Flower's servicer answers SERVING as soon as the process has started it, so
    for a SuperNode this means "up", not "admitted by the SuperLink".
    """
    with grpc.insecure_channel(address, options=_CHANNEL_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_serving(address: str, proc: ManagedProcess, timeout: float) -> None:
    """Block until ``proc``'s health service is SERVING; fail early if it dies."""
    wait_until(lambda: is_serving(address), timeout, f"SERVING on {address}", proc)
