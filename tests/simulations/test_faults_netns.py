"""The lab of network namespaces: hosts that reach each other, partitions, cleanup."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from simulations.deployment.netns import (
    LabView,
    NetLab,
    NetLabError,
    capability_problem,
    leftovers,
)

CANNOT = capability_problem()
needs_netns = pytest.mark.skipif(CANNOT is not None, reason=f"fault harness: {CANNOT}")

_CONNECT = (
    "import socket,sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], 7000), timeout=1.5).close(); print('ok')\n"
    "except OSError as e:\n"
    "    print(type(e).__name__)\n"
)
_LISTEN = (
    "import socket,sys\n"
    "s=socket.create_server((sys.argv[1], 7000)); print('ready', flush=True)\n"
    "while True: s.accept()[0].close()\n"
)


def _connect(view: LabView, src: int, address: str) -> str:
    argv = [*view.hosts[src].prefix, sys.executable, "-c", _CONNECT, address]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()


@needs_netns
def test_hosts_reach_the_server_until_their_link_goes_down() -> None:
    lab = NetLab(2)
    view = lab.open()
    server = None
    try:
        assert LabView.from_json(view.to_json()) == view
        assert {h.netns for h in view.hosts} | {view.server.netns} <= set(
            leftovers(lab.prefix)
        )
        server = subprocess.Popen(
            [*view.server.prefix, sys.executable, "-c", _LISTEN, view.server.address],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert server.stdout is not None and server.stdout.readline().startswith("ready")
        assert _connect(view, 0, view.server.address) == "ok"
        assert _connect(view, 1, view.server.address) == "ok"
        view.set_link(view.hosts[1], up=False)  # a partition of node 1 only
        assert _connect(view, 1, view.server.address) != "ok"
        assert _connect(view, 0, view.server.address) == "ok"
        view.set_link(view.hosts[1], up=True)
        # Back within seconds (the failed ARP entry is retried): a healed partition.
        deadline = time.monotonic() + 15
        while _connect(view, 1, view.server.address) != "ok":
            assert time.monotonic() < deadline, "node 1 never reached the server again"
        view.cap_rate(view.hosts[0], 512)  # tc tbf on both ends, then removed
        assert _connect(view, 0, view.server.address) == "ok"
        view.cap_rate(view.hosts[0], None)
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=10)
        assert lab.close() == []
    assert leftovers(lab.prefix) == []


@needs_netns
def test_a_failed_open_removes_what_it_made(monkeypatch: pytest.MonkeyPatch) -> None:
    lab = NetLab(3)
    real = NetLab._host
    calls = []

    def fail_on_third(self: NetLab, *args: object) -> object:
        calls.append(args)
        if len(calls) == 3:
            raise NetLabError("injected")
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(NetLab, "_host", fail_on_third)
    with pytest.raises(NetLabError, match="injected"):
        lab.open()
    assert leftovers(lab.prefix) == []


def test_lab_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="nodes"):
        NetLab(0)
    with pytest.raises(ValueError, match="prefix"):
        NetLab(2, prefix="x")
