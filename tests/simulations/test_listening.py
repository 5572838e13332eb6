"""The tests' listening-socket reader agrees with psutil, which it replaces in the
process watchers for speed (tests/helpers/listening.py)."""

from __future__ import annotations

import subprocess
import sys

import psutil

from tests.helpers.listening import listening

SERVER = """
import socket, sys, time
four = socket.socket(); four.bind(("127.0.0.1", 0)); four.listen()
six = socket.socket(socket.AF_INET6); six.bind(("::1", 0)); six.listen()
dual = socket.socket(socket.AF_INET6); dual.bind(("::", 0)); dual.listen()
out = socket.create_connection(("127.0.0.1", four.getsockname()[1]))  # not listening
print(four.getsockname()[1], six.getsockname()[1], dual.getsockname()[1], flush=True)
sys.stdin.read()
"""


def test_listening_sockets_match_psutil() -> None:
    """IPv4, IPv6 and dual-stack listeners are found with their addresses and
    ports; a connected socket is not; a process without listeners is absent."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    idle = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout is not None
        four, six, dual = (int(x) for x in proc.stdout.readline().split())
        found = listening([proc.pid, idle.pid])
        expected = {
            (c.laddr.ip, c.laddr.port)
            for c in psutil.Process(proc.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert found == {proc.pid: expected}
        assert expected == {("127.0.0.1", four), ("::1", six), ("::", dual)}
    finally:
        for p in (proc, idle):
            assert p.stdin is not None
            p.stdin.close()
            p.wait(timeout=10)
