"""What a local deployment is made of: its folders and addresses (checked when made),
and each SuperNode's host and the handle it is restarted from."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from simulations.deployment.certificates import LOOPBACK_SANS, NodeKey
from simulations.deployment.supernode_heartbeat import FLOWER_PULL_S, PULL_INTERVAL_MIN
from simulations.launch.processes import ManagedProcess


def _loopback(host: str, what: str) -> str:
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise ValueError(
        f"{what} must be a loopback IP address (127.0.0.0/8, ::1), got {host!r}"
    )


# A local node asks again after 0.5 s, not Flower's 3 s: a secure-aggregation round's
# four stages each waited up to 3 s after their message was ready.
PULL_INTERVAL_S = 0.5


@dataclass(frozen=True)
class DeploymentSpec:
    """Where a deployment keeps its files, whether it is secure, and its addresses.

    ``ca_dir`` is where the CA's key lives (default: ``default_ca_dir()``).
    ``server_host`` is where the SuperLink and nginx listen, the address nodes
    are given; ``node_host`` is where each SuperNode serves its own runtime API
    and health service. Both are loopback addresses: on Linux every 127.x.y.z
    is, so two of them stand in for two hosts. ``server_sans`` are the names the
    server certificate must carry beyond the loopback ones; a secure deployment's
    ``server_host`` must be one of them (or a loopback name). ``warm_clientapp``
    forks each node's ClientApp processes from a template that has imported Flower
    and torch (``launch/warm_template.py``); off, they start cold, as stock Flower
    does.
    ``pull_interval`` is how long an idle node waits before it asks the SuperLink
    again (``supernode_heartbeat.py``; ``None``: Flower's fixed 3 s).
    ``wake_superexecs``: the SuperExecs of the SuperLink and of each node are woken
    when a task is stored instead of asking every 0.1 s (``launch/superexec_wakeup.py``);
    off, they poll as stock Flower does. A node wakes its SuperExec through the
    heartbeat wrapper, so ``pull_interval=None`` with it on still starts that wrapper.
    """

    work_dir: Path
    certs_dir: Path
    secure: bool = True
    ca_dir: Path | None = None
    server_host: str = "127.0.0.1"
    node_host: str = "127.0.0.1"
    server_sans: tuple[str, ...] = ()
    warm_clientapp: bool = True
    pull_interval: float | None = PULL_INTERVAL_S
    wake_superexecs: bool = True

    def __post_init__(self) -> None:
        if self.pull_interval is not None and not (
            PULL_INTERVAL_MIN <= self.pull_interval <= FLOWER_PULL_S
        ):
            raise ValueError(
                f"pull_interval must be from {PULL_INTERVAL_MIN} to {FLOWER_PULL_S} s "
                f"(None: Flower's own), got {self.pull_interval}"
            )
        if not self.work_dir.is_absolute() or not self.certs_dir.is_absolute():
            raise ValueError("deployment folders must be absolute paths")
        _loopback(self.server_host, "server_host")
        _loopback(self.node_host, "node_host")
        named = {*LOOPBACK_SANS, *self.server_sans}
        if self.secure and self.server_host not in named:
            raise ValueError(
                f"server_host {self.server_host}: the server certificate must name the "
                f"address nodes use; add it to server_sans ({list(self.server_sans)})"
            )


@dataclass(frozen=True)
class NodeHost:
    """A SuperNode on a host of its own (a network namespace, ``netns.py``): the
    command prefix that runs there, its address (its health service binds it), and
    the SuperLink address it dials from there. Its runtime API binds that host's
    own loopback, so fixed ports cannot collide."""

    prefix: tuple[str, ...]
    address: str
    superlink: str
    health_port: int = 9095
    runtime_port: int = 9094


@dataclass
class SuperNodeHandle:
    """A running SuperNode and how it was started (to restart it the same way)."""

    index: int
    process: ManagedProcess
    node_config: dict[str, Any]
    key: NodeKey | None
    health: str
    extra_env: dict[str, str] = field(default_factory=dict)
    host: NodeHost | None = None
    heartbeat_interval: float | None = None
    task_patience: float | None = None

    @property
    def heartbeat_lapse_s(self) -> float:
        """How long after its last heartbeat the SuperLink counts the node offline
        (Flower's patience times the interval it declared): until then a crashed
        node's messages wait, and the node itself is refused admission."""
        interval = self.heartbeat_interval or HEARTBEAT_DEFAULT_INTERVAL
        return HEARTBEAT_PATIENCE * interval
