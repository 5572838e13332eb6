"""Separate hosts on one machine: Linux network namespaces joined by a bridge.

A :class:`NetLab` gives the server and every SuperNode its own network
namespace, each with one veth link to a bridge that lives in a namespace of its
own (the "switch"), so the machine's own namespace is never part of the network
and no packet can leave it (no namespace has a default route). Because the
links' switch ends sit in the switch namespace, a fault can take one down
(a partition) or cap its rate (``tc tbf``) from any namespace.

Every name starts with a per-run prefix (``pf`` + 6 hex digits, interface names
have 15 bytes at most); :meth:`NetLab.close` deletes the namespaces, which
removes their links, and :func:`leftovers` lists anything of a prefix that is
still there (the tests assert it is nothing).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
from dataclasses import asdict, dataclass, field

IP = "ip"
TC = "tc"
COMMAND_TIMEOUT_S = 20.0
SERVER_OCTET = 2
NODE_OCTET0 = 10
MAX_NODES = 240


class NetLabError(RuntimeError):
    """A namespace or link could not be set up, changed or removed."""


def capability_problem() -> str | None:
    """Why this machine cannot run the harness (not root, no ``ip netns``), or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (the harness runs as root, e.g. in CI)"
    for tool in (IP, TC):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    probe = f"pf{secrets.token_hex(3)}-probe"
    try:
        added = _run([IP, "netns", "add", probe], check=False)
        if added.returncode != 0:
            return f"'ip netns add' failed: {added.stderr.strip()}"
        veth = _run(
            [IP, "-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            check=False,
        )
        if veth.returncode != 0:
            return f"veth links cannot be created: {veth.stderr.strip()}"
    finally:
        _run([IP, "netns", "del", probe], check=False)
    return None


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )
    if check and done.returncode != 0:
        raise NetLabError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done


def new_prefix() -> str:
    """A fresh per-run prefix for every namespace and link name."""
    return f"pf{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Host:
    """One namespace on the lab's network: its name, address and switch-side link."""

    name: str
    netns: str
    address: str
    link: str  # the veth end in the switch namespace (down = partitioned)

    @property
    def prefix(self) -> tuple[str, ...]:
        """Prepend to a command to run it on this host."""
        return (IP, "netns", "exec", self.netns)


@dataclass(frozen=True)
class LabView:
    """What a process needs to use a lab it does not own: names, addresses, faults.

    It travels as JSON from the process that made the lab (and will remove it) to
    the one that runs the deployment inside the server's namespace.
    """

    prefix: str
    switch: str
    server: Host
    hosts: tuple[Host, ...]

    def set_link(self, host: Host, up: bool) -> None:
        """Take ``host``'s link to the switch down (a partition) or up again."""
        _run([IP, "-n", self.switch, "link", "set", host.link, "up" if up else "down"])

    def cap_rate(self, host: Host, kbit: int | None) -> None:
        """Cap both directions of ``host``'s link with ``tc tbf``; None removes it."""
        for netns, dev in ((self.switch, host.link), (host.netns, "eth0")):
            _run([TC, "-n", netns, "qdisc", "del", "dev", dev, "root"], check=False)
            if kbit is not None:
                burst = max(kbit * 1000 // 8 // 10, 16_000)  # 100 ms worth, ≥ 16 kB
                rate = ["rate", f"{kbit}kbit", "burst", str(burst), "latency", "1s"]
                _run([TC, "-n", netns, "qdisc", "add", "dev", dev, "root", "tbf", *rate])

    def to_json(self) -> str:
        """The JSON form (see :meth:`from_json`)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LabView:
        """Read what :meth:`to_json` wrote."""
        data = json.loads(text)
        return cls(
            data["prefix"],
            data["switch"],
            Host(**data["server"]),
            tuple(Host(**h) for h in data["hosts"]),
        )


@dataclass
class NetLab:
    """A switch, a server host and ``nodes`` node hosts, each in its own namespace."""

    nodes: int
    prefix: str = field(default_factory=new_prefix)
    _made: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= MAX_NODES:
            raise ValueError(f"nodes must be in [1, {MAX_NODES}], got {self.nodes}")
        if not (self.prefix.startswith("pf") and len(self.prefix) == 8):
            raise ValueError(f"prefix must be 'pf' + 6 characters, got {self.prefix!r}")
        # A /24 per run, from the prefix: namespaces never see each other's anyway.
        seed = int(self.prefix[2:], 16)
        self.subnet = ipaddress.ip_network(
            f"10.{100 + seed % 150}.{seed // 150 % 256}.0/24"
        )
        self.switch = f"{self.prefix}-sw"
        self.bridge = f"{self.prefix}-br"

    def open(self) -> LabView:
        """Create the switch, the server and every node host (undone by close)."""
        try:
            self._namespace(self.switch)
            _run([IP, "-n", self.switch, "link", "add", self.bridge, "type", "bridge"])
            _run([IP, "-n", self.switch, "link", "set", self.bridge, "up"])
            server = self._host("server", f"{self.prefix}-srv", "hs", SERVER_OCTET)
            hosts = tuple(
                self._host(f"node-{i}", f"{self.prefix}-n{i}", f"h{i}", NODE_OCTET0 + i)
                for i in range(self.nodes)
            )
        except BaseException:
            self.close()
            raise
        return LabView(self.prefix, self.switch, server, hosts)

    def _namespace(self, name: str) -> None:
        _run([IP, "netns", "add", name])
        self._made.append(name)
        _run([IP, "-n", name, "link", "set", "lo", "up"])

    def _host(self, name: str, netns: str, link_tag: str, octet: int) -> Host:
        self._namespace(netns)
        link = f"{self.prefix}-{link_tag}"
        _run([IP, "link", "add", link, "netns", self.switch, "type", "veth",
              "peer", "name", "eth0", "netns", netns])  # fmt: skip
        _run([IP, "-n", self.switch, "link", "set", link, "master", self.bridge, "up"])
        address = str(self.subnet.network_address + octet)
        _run([IP, "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0"])
        _run([IP, "-n", netns, "link", "set", "eth0", "up"])
        return Host(name, netns, address, link)

    def close(self) -> list[str]:
        """Delete every namespace made (their links go with them); return errors."""
        errors = []
        for name in reversed(self._made):
            done = _run([IP, "netns", "del", name], check=False)
            if done.returncode != 0 and "No such file" not in done.stderr:
                errors.append(f"ip netns del {name}: {done.stderr.strip()}")
        self._made.clear()
        return errors


def leftovers(prefix: str) -> list[str]:
    """Namespaces and links in this namespace whose name starts with ``prefix``."""
    found = []
    for argv in ([IP, "netns", "list"], [IP, "-o", "link", "show"]):
        done = _run(argv, check=False)
        for line in done.stdout.splitlines():
            words = line.replace(":", " ").split()
            found += [w for w in words if w.startswith(prefix)]
    return found
