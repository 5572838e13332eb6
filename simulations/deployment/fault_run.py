"""One secure deployment on a lab of network namespaces, under a fault schedule.

This runs inside the server's namespace (``simulations.soak`` starts it there
with ``ip netns exec``), so the SuperLink, nginx, the operator's ``flwr`` CLI
and this script share that host's loopback exactly as in ``simulations.deploy``.
Each SuperNode runs in its own namespace and dials the server's address on the
lab's bridge, where the fault proxy (``tcp_faults``) stands in front of nginx;
the server certificate names that address. A ``superlink-kill`` fault stops the
run; the SuperLink (and nginx) are started again, the nodes restarted with their
keys and state folders, and the run resumed from its checkpoint.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import tomli_w

from client.privacy.policy import POLICY_FILE
from common.config import RunConfig
from server.results.outcome import Outcome, close_run, serverapp_settled
from simulations.deploy import SERVERAPP_STOP_GRACE_S, write_node_policy
from simulations.deployment.certificates import (
    TLS_FILES,
    TlsFiles,
    certificate_sans,
    default_ca_dir,
    ensure_tls_files,
    server_san,
)
from simulations.deployment.deployment_spec import DeploymentSpec, NodeHost
from simulations.deployment.faults import Fault, FaultSchedule
from simulations.deployment.front_proxy import accepts, nginx_binary
from simulations.deployment.injector import FaultInjector, rounds_recorded
from simulations.deployment.local import LocalDeployment
from simulations.deployment.netns import LabView
from simulations.deployment.node_identity import ensure_node_identity
from simulations.launch.flwr_run import follow_run
from simulations.launch.options import (
    APP_DIR,
    build_overrides,
    pyproject_defaults,
    resume_overrides,
)
from simulations.launch.output import StreamEnd, interrupted, report_results
from simulations.launch.preflight import partition_sizes
from simulations.launch.processes import (
    LEFTOVER_GRACE_S,
    ManagedProcess,
    become_subreaper,
    descendants,
    install_signal_handlers,
    stop_processes,
    wait_until,
)

PROXY_PORT = 9443  # the server's public port on the lab (the fault proxy's)
RULES_FILE = "proxy-rules.json"


class FaultRun:
    """The deployment, its fault proxy and injector, and the run's phases."""

    def __init__(self, args: argparse.Namespace, lab: LabView, schedule: FaultSchedule):
        self.args = args
        self.lab = lab
        self.schedule = schedule
        self.overrides = resume_overrides(args) if args.resume else build_overrides(args)
        self.results_dir = Path(self.overrides["results-dir"])
        self.state_root = self.results_dir / "nodes"
        self.certs = self.results_dir / "certs"
        self.ca_dir = (args.ca_dir or default_ca_dir()).expanduser().resolve()
        self.cfg = RunConfig.from_run_config({**pyproject_defaults(), **self.overrides})
        self.work = Path(tempfile.mkdtemp(prefix="privfed-soak-"))
        self.proxy: ManagedProcess | None = None
        self.superlink_killed = threading.Event()
        self.injector: FaultInjector | None = None
        self.phases: list[dict[str, Any]] = []

    # -- set-up ---------------------------------------------------------------------
    def prepare(self) -> None:
        """Policies, certificates naming the server's lab address, identities."""
        sizes = partition_sizes(self.cfg, self.args.clients)
        for i in range(self.args.clients):
            write_node_policy(self.state_root / f"node-{i}", self.cfg, sizes[i])
        nginx_binary()
        self._certificates_for_this_lab()
        if self.cfg.secure_aggregation:
            for i in range(self.args.clients):
                ensure_node_identity(
                    self.state_root / f"node-{i}", self.ca_dir, f"node-{i}"
                )
        print(
            f"[soak] node policies (nodes/node-*/{POLICY_FILE}), certificates and "
            f"identities in {self.results_dir}; logs in {self.work}",
            flush=True,
        )

    def _certificates_for_this_lab(self) -> None:
        """TLS files whose server certificate names this lab's server address.

        A resumed soak runs in a new lab, at a new address, so the certificate its
        first run issued names the old one: the harness issues new TLS files from
        the same CA (the nodes trust the CA, not one certificate). Anything else a
        reused folder lacks is refused by :func:`ensure_tls_files`, naming it.
        """
        address = self.lab.server.address
        files = TlsFiles.in_folder(self.certs)
        moved = (
            self.args.resume is not None
            and files.server_cert.exists()
            and not (self.certs / "ca.key").exists()
            and server_san(address) not in certificate_sans(files.server_cert)
        )
        if moved:
            for name in TLS_FILES:
                (self.certs / name).unlink(missing_ok=True)
            print(
                f"[soak] resumed in a new lab: new server certificate for {address} "
                f"from the CA in {self.ca_dir}",
                flush=True,
            )
        ensure_tls_files(self.certs, self.ca_dir, [address])

    def start_server(self, dep: LocalDeployment) -> None:
        """SuperLink and nginx on this host's loopback, the fault proxy on the lab."""
        dep.start_superlink()
        assert dep.ports is not None
        if self.proxy is not None:
            self.proxy.stop(grace=2.0)
        argv = [sys.executable, "-m", "simulations.deployment.tcp_faults",
                "--listen", f"{self.lab.server.address}:{PROXY_PORT}",
                "--upstream", f"127.0.0.1:{dep.ports.public}",
                "--rules", str(self.work / RULES_FILE)]  # fmt: skip
        logs = self.work / "logs"
        self.proxy = ManagedProcess("tcp-faults", argv, dep.env, logs / "tcp-faults.log")
        wait_until(
            lambda: accepts(self.lab.server.address, PROXY_PORT), 30, "the fault proxy",
            self.proxy,
        )  # fmt: skip

    def node_host(self, i: int) -> NodeHost:
        """Node ``i``'s namespace, address and the server address it dials."""
        host = self.lab.hosts[i]
        superlink = f"{self.lab.server.address}:{PROXY_PORT}"
        return NodeHost(host.prefix, host.address, superlink)

    def heartbeat_of(self, i: int) -> float | None:
        """``--kill-heartbeat`` for a node the schedule only ever kills, else None
        (Flower's 30 s: a shorter one would take a partitioned node offline)."""
        kinds = {f.kind for f in self.schedule.faults if i in f.nodes}
        return getattr(self.args, "kill_heartbeat", None) if kinds == {"kill"} else None

    def start_nodes(self, dep: LocalDeployment) -> None:
        """Every SuperNode in its namespace (registered first), waited for."""
        for i in range(self.args.clients):
            config = {"partition-id": i, "num-partitions": self.args.clients,
                      "state-dir": str(self.state_root / f"node-{i}")}  # fmt: skip
            key = dep.node_key(i)
            dep.start_supernode(
                i, config, key, wait=False, host=self.node_host(i),
                heartbeat_interval=self.heartbeat_of(i),
                task_patience=getattr(self.args, "task_patience", None),
            )  # fmt: skip
        for i in range(self.args.clients):
            dep.wait_ready(i)
        print(
            f"[soak] {self.args.clients} SuperNodes admitted, each on its own host "
            f"(namespace), through {self.lab.server.address}:{PROXY_PORT}",
            flush=True,
        )

    # -- the run --------------------------------------------------------------------
    def _watchdog(self, dep: LocalDeployment) -> Any:
        reported: set[int] = set()

        def check() -> str | None:
            if self.superlink_killed.is_set():
                return "the SuperLink was killed (fault 'superlink-kill')"
            expected = self.injector.expected_exits if self.injector else set()
            for handle in dep.exited_supernodes():
                if handle.index not in reported | expected:
                    reported.add(handle.index)
                    print(
                        f"[soak] WARNING: SuperNode {handle.index} exited by itself "
                        f"(code {handle.process.popen.returncode}); log "
                        f"{handle.process.log_path}",
                        file=sys.stderr,
                        flush=True,
                    )
            gone = {h.index for h in dep.exited_supernodes()} - expected
            if len(gone) == self.args.clients:
                return "every SuperNode has exited"
            return dep.problem()

        return check

    def _phase(
        self, dep: LocalDeployment, overrides: dict[str, Any], deadline: float
    ) -> StreamEnd:
        launched_at = time.time()
        run_config = self.work / f"run-config-{len(self.phases)}.toml"
        run_config.write_text(tomli_w.dumps(overrides))
        end = follow_run(
            dep.submit(run_config, APP_DIR), deadline, self._watchdog(dep),
            serverapp_grace=SERVERAPP_STOP_GRACE_S,
            serverapp_done=lambda: serverapp_settled(self.results_dir, launched_at),
        )  # fmt: skip
        self.phases.append(
            {
                "launched_at": launched_at,
                "outcome": str(end.outcome),
                "reason": end.reason,
                "rounds": rounds_recorded(self.results_dir),
            }
        )
        return end

    def _resume(self, dep: LocalDeployment) -> dict[str, Any]:
        """After a SuperLink kill: close the run's summary, restart the server, restart
        every node with its key and state, and the overrides that resume the run."""
        close_run(self.results_dir, Outcome.FAILED, "the SuperLink was killed",
                  self.cfg.num_rounds, self.phases[-1]["launched_at"])  # fmt: skip
        for handle in list(dep.nodes.values()):
            handle.process.stop(grace=0.0)
        if dep.proxy is not None:
            dep.proxy.stop(grace=2.0)
        self.start_server(dep)
        for i in range(self.args.clients):
            dep.node_key(i)  # a SuperLink without a database forgot every key
            dep.restart_supernode(i)
        print(
            "[soak] SuperLink restarted; every node restarted with its key and "
            "state folder; resuming the run from its checkpoint",
            flush=True,
        )
        again = argparse.Namespace(**vars(self.args))
        again.resume, again.results_dir, again.set, again.preset = (
            str(self.results_dir), None, [], None)  # fmt: skip
        for option in ("rounds", "target_epsilon", "noise_multiplier", "privacy_mode",
                       "seed", "fraction_train", "local_epochs", "batch_size"):  # fmt: skip
            setattr(again, option, None)
        return resume_overrides(again)

    def run(self) -> tuple[int, float]:
        """Set up, run (and resume after a SuperLink kill), tear down; exit code and
        wall seconds."""
        self.prepare()
        become_subreaper()
        install_signal_handlers()
        started = time.monotonic()
        launched_at = time.time()
        deadline = started + self.args.timeout
        end: StreamEnd
        spec = DeploymentSpec(self.work, self.certs, ca_dir=self.ca_dir,
                              server_sans=(self.lab.server.address,))  # fmt: skip
        try:
            with LocalDeployment(spec) as dep:
                self.start_server(dep)
                self.start_nodes(dep)
                self.injector = FaultInjector(
                    self.schedule, dep, self.lab, self.work / RULES_FILE,
                    self.results_dir, on_superlink_kill=self._on_kill,
                )  # fmt: skip
                self.injector.start()
                end = self._phase(dep, self.overrides, deadline)
                if self.superlink_killed.is_set():
                    self.injector.stop()
                    overrides = self._resume(dep)
                    self.superlink_killed.clear()
                    self.injector.start()  # the faults still to come
                    launched_at = time.time()
                    end = self._phase(dep, overrides, deadline)
                self.injector.stop()
        except KeyboardInterrupt as exc:
            end = interrupted(exc)
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
            print(f"[soak] the deployment failed: {exc}", file=sys.stderr, flush=True)
            end = StreamEnd(Outcome.FAILED, f"the deployment failed: {exc}")
        finally:
            if self.injector is not None:
                self.injector.stop()
            if self.proxy is not None:
                self.proxy.stop(grace=2.0)
            stop_processes(descendants(), grace=LEFTOVER_GRACE_S)
        seconds = time.monotonic() - started
        code = report_results(
            end, self.results_dir, self.cfg.num_rounds, seconds, self.work, launched_at
        )
        return code, seconds

    def _on_kill(self, fault: Fault) -> None:
        self.superlink_killed.set()
