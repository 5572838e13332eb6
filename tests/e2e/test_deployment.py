"""Real deployment: SuperLink and SuperNodes as processes, TLS, auth, faults."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from client.privacy.ledger_store import LEDGER_FILE
from client.privacy.policy import POLICY_FILE, PrivacyPolicy
from client.show_ledger import main as show_ledger
from common.config import RunConfig
from common.ledger.privacy_ledger import PrivacyLedger, epsilon_of_history
from simulations.deploy import write_node_policy
from simulations.deployment.certificates import (
    CA_DIR_ENV,
    certificate_sans,
    ensure_node_key,
    ensure_tls_files,
)
from simulations.deployment.deployment_spec import DeploymentSpec
from simulations.deployment.local import (
    ADMITTED_MARK,
    BIN,
    LocalDeployment,
    SuperNodeRefused,
)
from simulations.launch.flower_env import flower_environment, stage_app
from simulations.launch.options import APP_DIR, pyproject_defaults
from simulations.launch.preflight import partition_sizes
from simulations.launch.processes import (
    become_subreaper,
    descendants,
    stop_processes,
)
from simulations.launch.superexec_fork import PROCESS_NAME as FORKED_SUPEREXEC
from simulations.launch.superexec_wakeup import MODULE as WAKEUP_MODULE
from simulations.launch.warm_template import CLIENTAPP
from simulations.launch.warm_template import MODULE as WARM_MODULE
from tests.helpers.listening import listening
from tests.helpers.process_watch import (
    assert_all_gone,
    assert_loopback_only,
    run_watched,
    signal_after,
)

pytestmark = pytest.mark.e2e


def _rounds(results: Path) -> list[dict]:
    return [
        json.loads(line) for line in (results / "rounds.jsonl").read_text().splitlines()
    ]


def _by_partition(rounds: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for record in rounds:
        for client in record["clients"]:
            if client["partition_id"] is not None:
                out.setdefault(client["partition_id"], []).append(client)
    return out


def test_secure_deployment_three_nodes_two_rounds(tmp_path: Path) -> None:
    """TLS + auth, 3 SuperNodes x 2 rounds: results, cumulative ε per node, clean exit."""
    results = tmp_path / "run"
    code, out, watch = run_watched(
        ["--clients", "3", "--rounds", "2", "--set", "fraction-evaluate=0.0",
         "--results-dir", str(results)],
        module="simulations.deploy",
    )  # fmt: skip
    assert code == 0, out[-4000:]
    assert "TLS + SuperNode authentication" in out
    assert "3 written from the run's privacy settings, 0 kept" in out
    assert f"[privfed] results: {results}" in out
    for name in ("summary.json", "rounds.jsonl", "model.pt", "model.ts", "certs/ca.crt"):
        assert (results / name).is_file(), name
    ca_key = Path(os.environ[CA_DIR_ENV]).resolve() / "ca.key"  # the tests' CA folder
    assert f"CA key in {ca_key.parent}" in out
    assert stat.S_IMODE(ca_key.stat().st_mode) == 0o600
    assert not list(results.rglob("ca.key")), "the CA key was written into the results"
    rounds = _rounds(results)
    assert [r["clients_trained"] for r in rounds] == [3, 3]
    sizes = partition_sizes(RunConfig.from_run_config(pyproject_defaults()), 3)
    for pid, history in _by_partition(rounds).items():
        eps = [c["epsilon"] for c in history]
        assert eps == sorted(eps) and eps[0] < eps[-1], pid
        last = history[-1]
        assert last["epsilon"] == pytest.approx(
            epsilon_of_history([tuple(h) for h in last["history"]], 1e-5, "rdp")
        )
        assert last["ledger_released"] and last["delta"] == 1e-5
        assert last["accountant"] == "opacus-rdp" and last["reason"] is None
        ledger_file = results / "nodes" / f"node-{pid}" / LEDGER_FILE
        policy = PrivacyPolicy.from_file(ledger_file.parent / POLICY_FILE)
        assert policy.release_ledger and policy.epsilon_budget == 8.0  # target-epsilon
        assert policy.planning_records == sizes[pid]  # public to the owner of every node
        assert PrivacyLedger.from_json(ledger_file.read_text()).epsilon() == pytest.approx(
            last["epsilon"]
        )
        assert show_ledger([str(ledger_file.parent), "--json"]) == 0
    # each node's messages ran in children of its warm template, not cold
    templates = [c for c in watch.commands if f"-m {WARM_MODULE} {CLIENTAPP.name} -- " in c]
    assert len(templates) >= 3, sorted(watch.commands)
    scripts = [c for c in watch.commands if f"/{CLIENTAPP.name} --" in c]
    assert len(scripts) >= 6 and all("/privfed-warm-" in c for c in scripts), scripts
    # the SuperLink's and every node's SuperExec were forked from them (not started
    # cold) and woken per task, not polling
    forked = [pid for pid, name in watch.programs.items() if name == FORKED_SUPEREXEC]
    assert len(forked) >= 4, watch.programs
    assert not any(f"-m {WAKEUP_MODULE} superexec " in c for c in watch.commands)
    assert not any(c.endswith("flower-superexec") or "/flower-superexec " in c
                   for c in watch.commands), sorted(watch.commands)  # fmt: skip
    assert_loopback_only(watch)
    assert_all_gone(watch)


def test_sigterm_stops_the_deployment_and_the_summary_says_interrupted(
    tmp_path: Path,
) -> None:
    """SIGTERM after round 1: the run is stopped with `flwr stop` before any node
    is, the ServerApp records its own end (not a node failure), exit 130, no
    SuperLink or SuperNode left, and summary.json says interrupted with the
    rounds done, accuracy and max ε with its accountant, δ and unit."""
    results = tmp_path / "run"
    code, out, watch = signal_after(
        "simulations.deploy",
        ["--clients", "2", "--rounds", "50", "--set", "fraction-evaluate=0.0",
         "--results-dir", str(results)],
        "[privfed] round 1/50",
        signal.SIGTERM,
    )  # fmt: skip
    assert code == 130, out[-3000:]
    assert_all_gone(watch)
    assert re.search(r"\[privfed\] run \d+ stopped \(flwr stop\)", out), out[-3000:]
    rounds = _rounds(results)
    summary = json.loads((results / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    assert summary["stop_reason"] == "the launcher was interrupted by SIGTERM"
    assert summary["rounds_completed"] == len(rounds) >= 1
    assert summary["final_central"] == rounds[-1]["central"]
    assert summary["max_epsilon"] == rounds[-1]["max_epsilon"] > 0
    assert summary["privacy_unit"] == "record" and summary["accountant"] == "opacus-rdp"
    # The ServerApp wrote its summary after the stop, before the nodes went away.
    assert summary.get("serverapp_stop_reason"), (summary, out[-3000:])
    assert "Node Unavailable" not in summary["serverapp_stop_reason"]
    assert "RoundFailed" not in summary["serverapp_stop_reason"]
    work = Path(out.split("logs in ", 1)[1].split()[0].rstrip(";"))
    link_log = (work / "logs" / "superlink.log").read_text()
    assert "ControlServicer.StopRun" in link_log
    assert link_log.index("ControlServicer.StopRun") < link_log.index("DeactivateNode")


@pytest.fixture
def deployment(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A secure deployment driven from the test; everything stopped afterwards."""
    become_subreaper()
    before = {p.pid for p in descendants()}
    dep = LocalDeployment(DeploymentSpec(tmp_path / "work", tmp_path / "certs"))
    try:
        yield dep
    finally:
        dep.close()
        left = [p for p in descendants() if p.pid not in before]
        alive = [p.name() for p in left if p.status() != psutil.STATUS_ZOMBIE]
        stop_processes(left)  # reaps exited orphans that were re-parented to us
        assert not alive, f"processes left: {alive}"


def test_unregistered_and_plaintext_supernodes_are_refused(
    deployment: LocalDeployment,
) -> None:
    """Only the registered, TLS-speaking node joins; the others never get work."""
    deployment.start_superlink()
    member = deployment.start_supernode(
        0, {"partition-id": 0, "num-partitions": 3}, deployment.node_key(0)
    )
    stranger = deployment.start_supernode(
        1, {"partition-id": 1, "num-partitions": 3},
        deployment.node_key(1, register=False), wait=False,
    )  # fmt: skip
    plaintext = deployment.start_supernode(
        2, {"partition-id": 2, "num-partitions": 3}, None, insecure=True, wait=False
    )
    with pytest.raises(SuperNodeRefused, match="Failed to activate SuperNode"):
        deployment.wait_ready(1, timeout=60)
    assert stranger.process.popen.returncode != 0
    assert "Exit Code: 305" in stranger.process.log_text()  # SUPERNODE_CONNECTION_ERROR
    # The SuperLink refused exactly this key (its log shows the PEM with "\n" escaped).
    pem = serialization.load_ssh_public_key(
        stranger.key.public_key.read_bytes()  # type: ignore[union-attr]
    ).public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    link_log = deployment.superlink.log_text()  # type: ignore[union-attr]
    refusal = "No SuperNode found with the given public key"
    assert refusal in link_log and pem.decode().splitlines()[1] in link_log
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in link_log

    # The plaintext node cannot get through TLS: the front proxy answers its plain
    # HTTP with 400, and it gives up without a node ID.
    with pytest.raises(SuperNodeRefused, match="400 Bad Request"):
        deployment.wait_ready(2, timeout=60)
    assert ADMITTED_MARK not in plaintext.process.log_text()
    nodes = deployment.registered_nodes()
    assert len(nodes) == 1 and nodes[0]["status"] == "online"
    assert ADMITTED_MARK + f" {nodes[0]['node-id']}" in member.process.log_text()


def _listening_ips(pid: int) -> set[str]:
    """The addresses ``pid`` and its descendants listen on."""
    ips = set()
    root = psutil.Process(pid)
    pids = [root.pid, *(p.pid for p in root.children(recursive=True))]
    for sockets in listening(pids).values():
        for address, _port in sockets:
            ip = ipaddress.ip_address(address)
            ips.add(str(getattr(ip, "ipv4_mapped", None) or ip))
    return ips


def test_superlink_and_supernodes_on_separate_host_addresses(tmp_path: Path) -> None:
    """The server host (SuperLink and nginx) on 127.0.0.2 and a device host (two
    SuperNodes) on 127.0.0.3, each node with its own FLWR_HOME and state folder:
    the server certificate names 127.0.0.2, the nodes verify it, join by their
    registered keys, and a one-round run completes. The SuperLink and the nodes are
    Flower's stock ones (``warm_clientapp=False``, ``pull_interval=None``,
    ``wake_superexecs=False``): every ClientApp process starts cold, an idle node
    pulls every 3 s, and each SuperExec asks for tasks every 0.1 s."""
    become_subreaper()
    before = {p.pid for p in descendants()}
    spec = DeploymentSpec(
        tmp_path / "work", tmp_path / "certs", server_host="127.0.0.2",
        node_host="127.0.0.3", server_sans=("127.0.0.2",), warm_clientapp=False,
        pull_interval=None, wake_superexecs=False,
    )  # fmt: skip
    results = tmp_path / "results"
    overrides = {"num-rounds": 1, "fraction-evaluate": 0.0, "min-available-nodes": 2,
                 "results-dir": str(results)}  # fmt: skip
    run_config = tmp_path / "run.toml"
    run_config.write_text(tomli_w.dumps(overrides))
    cfg = RunConfig.from_run_config({**pyproject_defaults(), **overrides})
    states = [tmp_path / "device" / f"node-{i}" for i in range(2)]
    for state, size in zip(states, partition_sizes(cfg, 2), strict=True):
        write_node_policy(state, cfg, size)
    dep = LocalDeployment(spec)
    try:
        dep.start_superlink()
        assert dep.tls is not None and dep.superlink is not None and dep.proxy is not None
        assert dep.address.startswith("127.0.0.2:")
        assert dep.control_address.startswith("127.0.0.2:")
        sans = certificate_sans(dep.tls.server_cert)
        assert x509.IPAddress(ipaddress.ip_address("127.0.0.2")) in sans
        for i, state in enumerate(states):
            config = {"partition-id": i, "num-partitions": 2, "state-dir": str(state)}
            dep.start_supernode(i, config, dep.node_key(i))
        assert _listening_ips(dep.superlink.pid) == {"127.0.0.2"}
        assert _listening_ips(dep.proxy.pid) == {"127.0.0.2"}
        for handle in dep.nodes.values():
            assert _listening_ips(handle.process.pid) == {"127.0.0.3"}
            assert f"--superlink {dep.address}" in " ".join(handle.process.popen.args)
            assert handle.process.popen.args[0].endswith("flower-supernode")  # stock
        flwr_run = dep.run_app(run_config, APP_DIR)
        try:
            out, _ = flwr_run.communicate(timeout=600)
        finally:
            if flwr_run.poll() is None:
                flwr_run.kill()
        assert flwr_run.returncode == 0, out[-3000:]
        summary = json.loads((results / "summary.json").read_text())
        assert summary["status"] == "completed", summary
        assert _rounds(results)[0]["clients_trained"] == 2
        homes = {dep.env["FLWR_HOME"]}
        for i, state in enumerate(states):
            home = spec.work_dir / f"supernode-{i}-home"
            assert list((home / "apps").iterdir()), "the node installed the app in its home"
            homes.add(str(home))
            assert (state / LEDGER_FILE).is_file()
        assert len(homes) == 3
    finally:
        dep.close()
        left = [p for p in descendants() if p.pid not in before]
        alive = [p.name() for p in left if p.status() != psutil.STATUS_ZOMBIE]
        stop_processes(left)
        assert not alive, f"processes left: {alive}"


def _post_status(address: str, path: str, ca: Path, cert: tuple[Path, Path] | None) -> int:
    """The HTTP status of an empty protobuf POST to ``path``, sent byte for byte
    (no client library normalises the path), optionally with a client certificate."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(*map(str, cert))
    request = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/protobuf"
        "\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    with (
        socket.create_connection((host, int(port)), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(request.encode())
        return int(tls.recv(256).split(b" ", 2)[1])


def test_outsider_with_address_and_ca_cert_cannot_register_run_or_list(
    deployment: LocalDeployment, tmp_path: Path
) -> None:
    """Someone given only the nodes' address and ca.crt is refused by the real flwr
    CLI (register a key, list nodes, list runs, submit a run) and by crafted paths;
    nothing of it reaches the SuperLink, and a node the operator registers joins."""
    deployment.start_superlink()
    assert deployment.tls is not None
    outsider = tmp_path / "outsider"
    home = outsider / "flwr-home"
    home.mkdir(parents=True)
    ca = outsider / "ca.crt"
    shutil.copy(deployment.tls.ca_cert, ca)
    conn = {"address": deployment.address, "root-certificates": str(ca), "insecure": False}
    config = {"superlink": {"default": "target", "target": conn}}
    (home / "config.toml").write_text(tomli_w.dumps(config))
    own_key = ensure_node_key(outsider / "keys", "mine")
    app = stage_app(APP_DIR, outsider)
    attempts = {
        "register": ["supernode", "register", str(own_key.public_key), "target"],
        "list nodes": ["supernode", "list", "target"],
        "list runs": ["ls", "target"],
        "run": ["run", str(app), "target"],
    }
    for what, args in attempts.items():
        done = subprocess.run(
            [str(BIN / "flwr"), *args], env=flower_environment(home), cwd=outsider,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode != 0, f"{what}: {done.stdout}{done.stderr}"
        assert "registered successfully" not in done.stdout, what
    # Paths that normalise differently, and the runtime API: never a 200.
    for path in (
        "/v1/control/list-nodes",
        "/v1/fleet/../control/list-nodes",
        "/v1/fleet/%2e%2e/control/list-nodes",
        "/v1/fleet/..%2fcontrol/list-nodes",
        "//v1/control/list-nodes",
        "/v1/runtime/get-nodes",
    ):
        assert _post_status(deployment.address, path, ca, None) in (400, 403, 404), path
    link = deployment.superlink
    assert link is not None and "/v1/control/" not in link.log_text()
    access = (deployment.spec.work_dir / "front-proxy" / "access.log").read_text()
    assert '"POST /v1/control/register-node HTTP/1.1" 403' in access

    # The operator's certificate opens the same route; its CLI (via the gateway)
    # sees that the outsider registered nothing, and registers a node that joins.
    tls = deployment.tls
    operator = (tls.operator_cert, tls.operator_key)
    assert _post_status(deployment.address, "/v1/control/list-nodes", ca, operator) == 200
    server_as_client = (tls.server_cert, tls.server_key)  # CA-signed, not for clients
    assert _post_status(
        deployment.address, "/v1/control/list-nodes", ca, server_as_client
    ) in (
        400,
        403,
    )
    # Another deployment's operator certificate from the same (per-user) CA, as an
    # old results folder would hold it, opens nothing here.
    other = ensure_tls_files(tmp_path / "old-results" / "certs")
    assert other.ca_cert.read_bytes() == tls.ca_cert.read_bytes()
    old_operator = (other.operator_cert, other.operator_key)
    assert (
        _post_status(deployment.address, "/v1/control/list-nodes", ca, old_operator) == 403
    )
    assert deployment.registered_nodes() == []
    deployment.start_supernode(
        0, {"partition-id": 0, "num-partitions": 1}, deployment.node_key(0)
    )
    nodes = deployment.registered_nodes()
    assert len(nodes) == 1 and nodes[0]["status"] == "online"


def _wait_for_round(results: Path, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = results / "rounds.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.5)
    pytest.fail(f"round {n} was not recorded within {timeout} s")


def test_killed_node_continues_its_ledger_and_corrupt_ledger_fails_closed(
    deployment: LocalDeployment, tmp_path: Path
) -> None:
    """Node 2 is killed and restarted: the run completes and its ε continues from
    disk. Node 1 starts with a corrupt ledger: it refuses, visibly, every round."""
    results = tmp_path / "results"
    states = {i: tmp_path / "nodes" / f"node-{i}" for i in range(3)}
    states[1].mkdir(parents=True)
    (states[1] / LEDGER_FILE).write_text('{"format": "privfed-ledger/1", "history": [[')
    # min-train-nodes 3: every round waits until all three nodes are online, so the
    # rounds after the crash wait for node 2's return rather than racing past it.
    overrides = {
        "num-rounds": 5, "fraction-evaluate": 0.0, "min-available-nodes": 3,
        "min-train-nodes": 3, "round-timeout": 120.0, "results-dir": str(results),
    }  # fmt: skip
    run_config = tmp_path / "run.toml"
    run_config.write_text(tomli_w.dumps(overrides))
    cfg = RunConfig.from_run_config({**pyproject_defaults(), **overrides})
    sizes = partition_sizes(cfg, 3)  # each node plans from its shard's (public) size
    for i, state in states.items():  # each node's owner accepts this run's settings
        assert write_node_policy(state, cfg, sizes[i]) == "written"
    deployment.start_superlink()
    for i in range(3):
        config = {"partition-id": i, "num-partitions": 3, "state-dir": str(states[i])}
        # Node 2, the one killed, declares Flower's least heartbeat interval: the
        # SuperLink gives up its in-flight message and re-admits it after 20 s, not 60.
        deployment.start_supernode(
            i, config, deployment.node_key(i), heartbeat_interval=10.0 if i == 2 else None
        )
    flwr_run = deployment.run_app(run_config, APP_DIR)
    try:
        _wait_for_round(results, 1)
        ledger_before = PrivacyLedger.from_json((states[2] / LEDGER_FILE).read_text())
        deployment.kill_supernode(2)
        time.sleep(2)
        deployment.restart_supernode(2)  # returns once the SuperLink re-admits it
        readmitted_at = time.time()
        out, _ = flwr_run.communicate(timeout=900)
    finally:
        if flwr_run.poll() is None:
            flwr_run.kill()
    assert flwr_run.returncode == 0, out[-4000:]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 5, summary
    later = [r for r in _rounds(results) if r["started_at"] > readmitted_at]
    assert later, "no round started after node 2 was re-admitted"
    for record in later:  # each of them waited for node 2 and instructed it
        assert 2 in [c["partition_id"] for c in record["clients"]], record["round"]

    ledger_after = PrivacyLedger.from_json((states[2] / LEDGER_FILE).read_text())
    assert ledger_after.rounds[: len(ledger_before.rounds)] == ledger_before.rounds
    assert len(ledger_after.rounds) > len(ledger_before.rounds)  # trained after restart
    assert ledger_after.epsilon() > ledger_before.epsilon()
    node2 = _by_partition(_rounds(results))[2]
    trained = [c for c in node2 if c["status"] == "trained"]
    assert trained[-1]["rounds_trained"] == len(ledger_after.rounds)
    assert trained[-1]["epsilon"] == pytest.approx(ledger_after.epsilon())

    for record in _rounds(results):
        corrupt = [c for c in record["clients"] if c["partition_id"] == 1]
        assert corrupt and corrupt[0]["status"] == "ledger-error", record["round"]
        assert "corrupt" in corrupt[0]["reason"]
        assert corrupt[0]["epsilon"] is None and not corrupt[0]["ledger_released"]
        assert record["clients_failed"] >= 1
    assert "corrupt" in out and "node" in out  # the server's log shows the refusal
    assert summary["client_failures"] >= 3
    assert (states[1] / LEDGER_FILE).read_text().endswith("[[")  # never overwritten


def test_partial_certificate_folder_fails_before_starting(tmp_path: Path) -> None:
    """A certificate folder missing a file exits 2, naming it, with nothing started."""
    certs = tmp_path / "certs"
    ensure_tls_files(certs)
    (certs / "server.key").unlink()
    code, out, watch = run_watched(
        ["--nodes", "2", "--certs-dir", str(certs), "--results-dir", str(tmp_path / "r")],
        timeout=120,
        module="simulations.deploy",
    )
    assert code == 2, out[-3000:]
    assert "lacks server.key" in out
    assert not watch.pids
