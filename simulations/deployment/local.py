"""A real local deployment: one SuperLink and N SuperNodes as separate processes.

Secure by default: TLS with the project's own CA, SuperNode authentication with
registered EC P-384 keys, nginx in front of the SuperLink so that whoever can
reach the nodes' address gets only the Fleet API (see ``front_proxy``), and
readiness through the gRPC health service. Every process binds a loopback
address (127.0.0.1 unless ``DeploymentSpec`` names others: 127.0.0.2 and
127.0.0.3 stand in for a server host and a device host) and is stopped by PID
when the deployment closes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import psutil
import tomli_w

from simulations.deployment.certificates import (
    NodeKey,
    TlsFiles,
    ensure_node_key,
    ensure_tls_files,
)
from simulations.deployment.deployment_spec import (
    DeploymentSpec,
    NodeHost,
    SuperNodeHandle,
)
from simulations.deployment.front_proxy import (
    ProxyPorts,
    launch_front_proxy,
    wait_front_proxy,
)
from simulations.deployment.health import wait_serving
from simulations.deployment.supernode_heartbeat import wrapper_args as supernode_wrapper
from simulations.launch.flower_env import (
    CONNECTION_NAME,
    flower_environment,
    install_app,
    stage_app,
)
from simulations.launch.flwr_run import SubmittedRun
from simulations.launch.processes import (
    ManagedProcess,
    descendants,
    free_port,
    stop_processes,
    wait_until,
)
from simulations.launch.superexec_wakeup import superlink_command
from simulations.launch.warm_template import CLIENTAPP
from simulations.launch.warm_template import wrapper_args as warm_wrapper

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = 120.0
# Printed by flower-supernode once the SuperLink has activated (admitted) the node.
ADMITTED_MARK = "SuperNode ID:"
# Between refused re-admissions of a restarted node (each try starts a SuperNode,
# about 1 CPU-second): the node gets in at most this long after its heartbeat lapses.
RESTART_RETRY_S = 1.0


class SuperNodeRefused(RuntimeError):
    """A SuperNode exited before the SuperLink admitted it (e.g. unregistered key)."""


def _flower_parent_pid(proc: psutil.Process) -> str | None:
    """The ``--parent-pid`` a Flower helper process was started with, if any."""
    try:
        argv = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    if "--parent-pid" in argv[:-1]:
        return argv[argv.index("--parent-pid") + 1]
    return None


def node_config_text(values: dict[str, Any]) -> str:
    """``--node-config`` text: space-separated ``key=value`` with TOML values."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


@dataclass
class LocalDeployment:
    """Start, restart and stop the processes of one local deployment."""

    spec: DeploymentSpec
    env: dict[str, str] = field(init=False)
    port: int = field(init=False, default=0)
    tls: TlsFiles | None = field(init=False, default=None)
    superlink: ManagedProcess | None = field(init=False, default=None)
    proxy: ManagedProcess | None = field(init=False, default=None)
    ports: ProxyPorts | None = field(init=False, default=None)
    nodes: dict[int, SuperNodeHandle] = field(init=False, default_factory=dict)
    _started: list[ManagedProcess] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.spec.work_dir.mkdir(parents=True, exist_ok=True)
        flwr_home = self.spec.work_dir / "flwr-home"
        flwr_home.mkdir(exist_ok=True)
        self.env = flower_environment(flwr_home)
        self._flwr_home = flwr_home

    @property
    def address(self) -> str:
        """The address nodes are given: the front proxy's public one when secure.

        Without a client certificate it serves only the Fleet API. When insecure
        it is the SuperLink's own port (every API, for anyone).
        """
        return self._server(self.ports.public if self.ports else self.port)

    @property
    def control_address(self) -> str:
        """Where this deployment's ``flwr`` CLI connects: the operator gateway."""
        return self._server(self.ports.operator if self.ports else self.port)

    def _server(self, port: int) -> str:
        host = self.spec.server_host
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _log(self, name: str) -> Path:
        logs = self.spec.work_dir / "logs"
        logs.mkdir(exist_ok=True)
        return logs / f"{name}.log"

    def start_superlink(self) -> None:
        """Start the SuperLink and wait until its health service is SERVING."""
        host = self.spec.server_host
        self.port = free_port(host)
        health = self._server(free_port(host))
        argv = [
            "--host", host, "--port", str(self.port),
            "--isolation", "subprocess",
            "--disable-runtime-dependency-installation",
            "--health-server-address", health,
        ]  # fmt: skip
        if self.spec.secure:
            self.tls = ensure_tls_files(
                self.spec.certs_dir, self.spec.ca_dir, self.spec.server_sans
            )
            argv += [
                "--ssl-ca-certfile", str(self.tls.ca_cert),
                "--ssl-certfile", str(self.tls.server_cert),
                "--ssl-keyfile", str(self.tls.server_key),
                "--enable-supernode-auth",
            ]  # fmt: skip
        else:
            argv.append("--insecure")
        superlink = str(BIN / "flower-superlink")
        if self.spec.wake_superexecs:
            argv = superlink_command(superlink, argv)
        else:
            argv = [superlink, *argv]
        self.superlink = ManagedProcess(
            "flower-superlink", argv, self.env, self._log("superlink"), self.spec.work_dir
        )
        self._started.append(self.superlink)
        wait_serving(health, self.superlink, STARTUP_TIMEOUT)
        if self.spec.secure:
            assert self.tls is not None
            ports = ProxyPorts.free(self.port, host)
            proxy_dir = self.spec.work_dir / "front-proxy"
            proxy_dir.mkdir(exist_ok=True)
            self.proxy = launch_front_proxy(proxy_dir, ports, self.tls, self.env)
            self._started.append(self.proxy)
            wait_front_proxy(self.proxy, proxy_dir, ports)
            self.ports = ports
        self._write_connection()

    def _write_connection(self) -> None:
        conn: dict[str, Any] = {"address": self.control_address}
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
        extra_env: dict[str, str] | None = None,
        host: NodeHost | None = None,
        heartbeat_interval: float | None = None,
        task_patience: float | None = None,
    ) -> SuperNodeHandle:
        """Start SuperNode ``index``; by default it uses the deployment's security.

        With ``wait`` it returns once the node serves health checks and the
        SuperLink has admitted it (see :meth:`wait_ready`). ``extra_env`` is added
        to the node's environment (benchmarks put a probe first on its ``PATH``).
        ``host`` runs it on a host of its own (the fault harness's namespaces).
        ``heartbeat_interval`` (seconds, at least 10) replaces the 30 s that Flower's
        SuperNode declares (``supernode_heartbeat``): if the node crashes, the
        SuperLink gives up its message and re-admits it after 2 x this, not 60 s.
        ``task_patience`` (seconds, at least 30) is how long its ClientApp processes
        may take to start (``supernode_heartbeat``; Flower's 30 s otherwise).
        """
        insecure = (not self.spec.secure) if insecure is None else insecure
        if host is None:
            node_host = self.spec.node_host
            health = f"{node_host}:{free_port(node_host)}"
            runtime, superlink = (node_host, free_port(node_host)), self.address
        else:
            health = f"{host.address}:{host.health_port}"
            runtime, superlink = ("127.0.0.1", host.runtime_port), host.superlink
        wrapper = supernode_wrapper(
            heartbeat_interval, task_patience, self.spec.pull_interval,
            self.spec.wake_superexecs,
        )  # fmt: skip
        binary = wrapper or [str(BIN / "flower-supernode")]
        if self.spec.warm_clientapp:
            binary = [*warm_wrapper(CLIENTAPP), *binary]
        argv = [
            *(host.prefix if host else ()),
            *binary,
            "--superlink", superlink,
            # its own runtime API (default 127.0.0.1:9094 collides)
            "--host", runtime[0], "--port", str(runtime[1]),
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
        # Its own FLWR_HOME, as on a separate machine: each ClientApp process
        # installs the FAB there, and installs into a shared folder could race.
        home = self._node_home(index)
        home.mkdir(exist_ok=True)
        env = {**flower_environment(home), **(extra_env or {})}
        proc = ManagedProcess(
            f"flower-supernode-{index}", argv, env,
            self._log(f"supernode-{index}"), self.spec.work_dir,
        )  # fmt: skip
        self._started.append(proc)
        handle = SuperNodeHandle(
            index, proc, node_config, key, health, extra_env or {}, host,
            heartbeat_interval, task_patience,
        )  # fmt: skip
        self.nodes[index] = handle
        if wait:
            self.wait_ready(index)
        return handle

    def wait_ready(self, index: int, timeout: float = STARTUP_TIMEOUT) -> None:
        """Wait until SuperNode ``index`` is SERVING and admitted by the SuperLink.

        Flower's health service says SERVING before the node has connected, so
        admission is read from the node's log; a node that exits first (refused,
        exit code 305) raises :class:`SuperNodeRefused` with its log tail.
        """
        handle = self.nodes[index]
        proc = handle.process
        try:
            wait_serving(handle.health, proc, timeout)
            wait_until(lambda: ADMITTED_MARK in proc.log_text(), timeout, "admission", proc)
        except RuntimeError as exc:
            if not proc.running():
                raise SuperNodeRefused(str(exc)) from None
            raise

    def stop_supernode(self, index: int, grace: float = 10.0) -> None:
        """Stop SuperNode ``index`` gracefully (SIGTERM: it leaves the SuperLink)."""
        self.nodes[index].process.stop(grace=grace)

    def kill_supernode(self, index: int) -> None:
        """Kill SuperNode ``index`` and its ClientApp processes at once (a crash)."""
        self.nodes[index].process.stop(grace=0.0)

    def restart_supernode(self, index: int, timeout: float = 180.0) -> SuperNodeHandle:
        """Start SuperNode ``index`` again with its key, node config and state.

        After a crash the SuperLink still counts the node online until its
        heartbeat lapses (:attr:`SuperNodeHandle.heartbeat_lapse_s`), and refuses to
        activate it again before then (the SuperNode exits with code 305). Retry
        until it is in.
        """
        old = self.nodes[index]
        deadline = time.monotonic() + timeout
        while True:
            handle = self.start_supernode(
                index, old.node_config, old.key, wait=False, extra_env=old.extra_env,
                host=old.host, heartbeat_interval=old.heartbeat_interval,
                task_patience=old.task_patience,
            )  # fmt: skip
            try:
                self.wait_ready(index, max(deadline - time.monotonic(), 1.0))
                return handle
            except SuperNodeRefused:
                handle.process.stop()
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"SuperNode {index} was not re-admitted within {timeout:.0f} s; "
                        f"its log ends with:\n{handle.process.log_tail()}"
                    ) from None
                time.sleep(RESTART_RETRY_S)

    def problem(self) -> str | None:
        """Why the run cannot go on (the SuperLink or its front proxy died), or None."""
        for what, proc in (("the SuperLink", self.superlink), ("nginx", self.proxy)):
            if proc is not None and not proc.running():
                return (
                    f"{what} exited with code {proc.popen.returncode}; its log "
                    f"({proc.log_path}) ends with:\n{proc.log_tail()}"
                )
        return None

    def exited_supernodes(self) -> list[SuperNodeHandle]:
        """SuperNodes that were started and have exited since."""
        return [h for h in self.nodes.values() if not h.process.running()]

    def _node_home(self, index: int) -> Path:
        return self.spec.work_dir / f"supernode-{index}-home"

    def _run_argv(self, run_config_file: Path, app_dir: Path) -> list[str]:
        staged = stage_app(app_dir, Path(tempfile.mkdtemp(dir=self.spec.work_dir)))
        # Runs submitted side by side would race to install the same FAB.
        install_app(staged, [self._flwr_home, *map(self._node_home, self.nodes)])
        return [
            str(BIN / "flwr"), "run", str(staged), CONNECTION_NAME, "--stream",
            "--run-config", str(run_config_file),
        ]  # fmt: skip

    def run_app(self, run_config_file: Path, app_dir: Path) -> subprocess.Popen[str]:
        """Submit the app with ``flwr run --stream``; the caller reads its output."""
        return subprocess.Popen(
            self._run_argv(run_config_file, app_dir),
            env=self.env,
            cwd=self.spec.work_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )

    def submit(
        self, run_config_file: Path, app_dir: Path, out: TextIO | None = None
    ) -> SubmittedRun:
        """Submit the app as a :class:`SubmittedRun`: output copied to ``out``, the
        run stoppable with ``flwr stop`` through the operator gateway."""
        argv = self._run_argv(run_config_file, app_dir)
        return SubmittedRun(argv, self.env, self.spec.work_dir, CONNECTION_NAME, out)

    def close(self) -> None:
        """Stop every process started (SuperNodes first, the SuperLink last), by PID.

        A SuperNode that exited by itself (e.g. refused) leaves its
        ``flower-superexec --parent-pid <pid>`` behind for a few seconds; with
        this process as subreaper it is one of our descendants and is stopped too.
        """
        servers = [p for p in (self.proxy, self.superlink) if p is not None]
        others = [p for p in reversed(self._started) if p not in servers]
        # Each SuperNode takes about a second to leave the SuperLink and stop:
        # stopped side by side, while the SuperLink and nginx still serve them.
        if others:
            with ThreadPoolExecutor(len(others)) as pool:
                list(pool.map(lambda proc: proc.stop(), others))
        for proc in reversed(self._started):
            if proc in servers:
                proc.stop()
        ours = {str(proc.pid) for proc in self._started}
        stop_processes([p for p in descendants() if _flower_parent_pid(p) in ours])

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
