"""A real local deployment: one SuperLink and N SuperNodes as separate processes.

Secure by default: TLS with the project's own CA, SuperNode authentication with
registered EC P-384 keys, and readiness through the gRPC health service. Every
process binds 127.0.0.1 and is stopped by PID when the deployment closes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import tomli_w

from simulations.certificates import NodeKey, TlsFiles, ensure_node_key, ensure_tls_files
from simulations.flower_env import CONNECTION_NAME, flower_environment
from simulations.health import wait_serving
from simulations.processes import ManagedProcess, free_port

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = 120.0


def node_config_text(values: dict[str, Any]) -> str:
    """``--node-config`` text: space-separated ``key=value`` with TOML values."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


@dataclass(frozen=True)
class DeploymentSpec:
    """Where a deployment keeps its files, and whether it is secure."""

    work_dir: Path
    certs_dir: Path
    secure: bool = True

    def __post_init__(self) -> None:
        if not self.work_dir.is_absolute() or not self.certs_dir.is_absolute():
            raise ValueError("deployment folders must be absolute paths")


@dataclass
class SuperNodeHandle:
    """A running SuperNode and how it was started (to restart it the same way)."""

    index: int
    process: ManagedProcess
    node_config: dict[str, Any]
    key: NodeKey | None
    health: str


@dataclass
class LocalDeployment:
    """Start, restart and stop the processes of one local deployment."""

    spec: DeploymentSpec
    env: dict[str, str] = field(init=False)
    port: int = field(init=False, default=0)
    tls: TlsFiles | None = field(init=False, default=None)
    superlink: ManagedProcess | None = field(init=False, default=None)
    nodes: dict[int, SuperNodeHandle] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.spec.work_dir.mkdir(parents=True, exist_ok=True)
        flwr_home = self.spec.work_dir / "flwr-home"
        flwr_home.mkdir(exist_ok=True)
        self.env = flower_environment(flwr_home)
        self._flwr_home = flwr_home

    @property
    def address(self) -> str:
        """The SuperLink's ``127.0.0.1:<port>`` (Fleet, Control and runtime APIs)."""
        return f"127.0.0.1:{self.port}"

    def _log(self, name: str) -> Path:
        logs = self.spec.work_dir / "logs"
        logs.mkdir(exist_ok=True)
        return logs / f"{name}.log"

    def start_superlink(self) -> None:
        """Start the SuperLink and wait until its health service is SERVING."""
        self.port = free_port()
        health = f"127.0.0.1:{free_port()}"
        argv = [
            str(BIN / "flower-superlink"),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--isolation", "subprocess",
            "--disable-runtime-dependency-installation",
            "--health-server-address", health,
        ]  # fmt: skip
        if self.spec.secure:
            self.tls = ensure_tls_files(self.spec.certs_dir)
            argv += [
                "--ssl-ca-certfile", str(self.tls.ca_cert),
                "--ssl-certfile", str(self.tls.server_cert),
                "--ssl-keyfile", str(self.tls.server_key),
                "--enable-supernode-auth",
            ]  # fmt: skip
        else:
            argv.append("--insecure")
        self.superlink = ManagedProcess(
            "flower-superlink", argv, self.env, self._log("superlink"), self.spec.work_dir
        )
        wait_serving(health, self.superlink, STARTUP_TIMEOUT)
        self._write_connection()

    def _write_connection(self) -> None:
        conn: dict[str, Any] = {"address": self.address}
        if self.spec.secure:
            assert self.tls is not None
            conn["root-certificates"] = str(self.tls.ca_cert)
            conn["insecure"] = False
        else:
            conn["insecure"] = True
        config = {"superlink": {"default": CONNECTION_NAME, CONNECTION_NAME: conn}}
        (self._flwr_home / "config.toml").write_text(tomli_w.dumps(config))

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a ``flwr`` CLI command against this deployment's SuperLink."""
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            cwd=self.spec.work_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def node_key(self, index: int, register: bool = True) -> NodeKey:
        """Node ``index``'s key pair, registered with the SuperLink when asked."""
        key = ensure_node_key(self.spec.certs_dir / "supernode-keys", f"node-{index}")
        if register:
            done = self.flwr("supernode", "register", str(key.public_key), CONNECTION_NAME)
            if done.returncode != 0:
                raise RuntimeError(
                    f"registering {key.public_key} failed: {done.stdout}{done.stderr}"
                )
        return key

    def registered_nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list`` as data (node id, status, ...)."""
        done = self.flwr("supernode", "list", CONNECTION_NAME, "--format", "json")
        if done.returncode != 0:
            raise RuntimeError(f"flwr supernode list failed: {done.stdout}{done.stderr}")
        return list(json.loads(done.stdout)["nodes"])

    def start_supernode(
        self,
        index: int,
        node_config: dict[str, Any],
        key: NodeKey | None = None,
        insecure: bool | None = None,
        wait: bool = True,
    ) -> SuperNodeHandle:
        """Start SuperNode ``index``; by default it uses the deployment's security."""
        insecure = (not self.spec.secure) if insecure is None else insecure
        health = f"127.0.0.1:{free_port()}"
        argv = [
            str(BIN / "flower-supernode"),
            "--superlink", self.address,
            "--port", str(free_port()),  # its own runtime API (default 9094 collides)
            "--health-server-address", health,
            "--node-config", node_config_text(node_config),
        ]  # fmt: skip
        if insecure:
            argv.append("--insecure")
        else:
            assert self.tls is not None, "start the SuperLink first"
            argv += ["--root-certificates", str(self.tls.ca_cert)]
        if key is not None:
            argv += ["--auth-supernode-private-key", str(key.private_key)]
        proc = ManagedProcess(
            f"flower-supernode-{index}", argv, self.env, self._log(f"supernode-{index}"),
            self.spec.work_dir,
        )  # fmt: skip
        handle = SuperNodeHandle(index, proc, node_config, key, health)
        self.nodes[index] = handle
        if wait:
            wait_serving(health, proc, STARTUP_TIMEOUT)
        return handle

    def kill_supernode(self, index: int) -> None:
        """Kill SuperNode ``index`` and its ClientApp processes at once (a crash)."""
        handle = self.nodes[index]
        handle.process.stop(grace=0.0)

    def restart_supernode(self, index: int, timeout: float = 180.0) -> SuperNodeHandle:
        """Start SuperNode ``index`` again with its key, node config and state.

        After a crash the SuperLink still counts the node online until its
        heartbeat lapses (up to 2 x 30 s), and refuses to activate it again
        before then (the SuperNode exits with code 305). Retry until it is in.
        """
        old = self.nodes[index]
        deadline = time.monotonic() + timeout
        while True:
            handle = self.start_supernode(index, old.node_config, old.key, wait=False)
            while handle.process.running() and time.monotonic() < deadline:
                if "SuperNode ID:" in handle.process.log_tail(60):
                    wait_serving(handle.health, handle.process, STARTUP_TIMEOUT)
                    return handle
                time.sleep(0.5)
            handle.process.stop()
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"SuperNode {index} was not re-admitted within {timeout:.0f} s; "
                    f"its log ends with:\n{handle.process.log_tail()}"
                )
            time.sleep(3)

    def run_app(self, run_config_file: Path, app_dir: Path) -> subprocess.Popen[str]:
        """Submit the app with ``flwr run --stream``; the caller reads its output."""
        return subprocess.Popen(
            [
                str(BIN / "flwr"),
                "run",
                str(app_dir),
                CONNECTION_NAME,
                "--stream",
                "--run-config",
                str(run_config_file),
            ],  # fmt: skip
            env=self.env,
            cwd=self.spec.work_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )

    def close(self) -> None:
        """Stop every SuperNode, then the SuperLink, each with its process tree."""
        for handle in self.nodes.values():
            handle.process.stop()
        if self.superlink is not None:
            self.superlink.stop()

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
