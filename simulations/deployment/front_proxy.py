"""nginx in front of the SuperLink: nodes get the Fleet API, the rest needs a certificate.

Flower 1.42 serves its Fleet, Control and runtime APIs on one HTTPS port, and
its Control API (``flwr supernode register``, ``flwr run``, ``flwr ls``) has no
authentication outside Flower Enterprise (OIDC). Whoever could reach the Fleet
API could therefore register a node key of their own. So the SuperLink binds a
loopback port that only its own host uses, and nginx (a Debian package) serves
two addresses in front of it:

* the **public** address, the one nodes are given: ``/v1/fleet/`` (node
  registration by a registered key, heartbeats, messages) for anyone who speaks
  TLS; every other route only with a client certificate signed by the CA
  (mutual TLS), i.e. the operator's;
* the **operator gateway**: the ``flwr`` CLI cannot present a client certificate,
  so it talks to this address, which forwards ``/v1/control/`` to the public
  address presenting ``operator.pem``. In a real deployment the gateway runs on
  the operator's machine; here both sit in one nginx process on a loopback
  address.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from simulations.deployment.certificates import TlsFiles
from simulations.launch.processes import ManagedProcess, free_port, wait_until

# The only routes a node needs (Flower's FleetHttpClient); one home for the rule.
FLEET_ROUTE_PREFIX = "/v1/fleet/"
CONTROL_ROUTE_PREFIX = "/v1/control/"
NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx")
STARTUP_TIMEOUT = 30.0
# Streams (``flwr run --stream``) and long polls stay open for a whole run.
PROXY_TIMEOUT_S = 3600


class ProxyError(RuntimeError):
    """The front proxy cannot be set up (nginx missing, bad configuration)."""


def nginx_binary() -> str:
    """The nginx executable, or a :class:`ProxyError` saying how to get one."""
    for candidate in NGINX_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    raise ProxyError(
        "nginx not found (looked for "
        + ", ".join(NGINX_CANDIDATES)
        + "); a secure deployment puts it in front of the SuperLink: install the "
        "Debian package (apt-get install nginx), or use --insecure to debug"
    )


@dataclass(frozen=True)
class ProxyPorts:
    """The SuperLink's own port and the two ports nginx serves, all on ``host``
    (the server's address: a loopback one here, 127.0.0.1 unless a test stands in
    for a separate server host with another)."""

    superlink: int
    public: int
    operator: int
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        ports = (self.superlink, self.public, self.operator)
        if len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
            raise ProxyError(f"proxy ports must be three distinct TCP ports: {ports}")
        if not ipaddress.ip_address(self.host).is_loopback:
            raise ProxyError(f"the front proxy binds loopback only, got {self.host}")

    @classmethod
    def free(cls, superlink: int, host: str = "127.0.0.1") -> ProxyPorts:
        """Two free ports on ``host`` beside the SuperLink's."""
        return cls(superlink, free_port(host), free_port(host), host)

    def address(self, port: int) -> str:
        """``host:port`` as nginx writes it (IPv6 in brackets)."""
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"


def certificate_serial(path: Path) -> str:
    """A certificate's serial as nginx's ``$ssl_client_serial`` shows it (hex bytes)."""
    serial = x509.load_pem_x509_certificate(path.read_bytes()).serial_number
    digits = f"{serial:X}"
    return digits.zfill(len(digits) + len(digits) % 2)


def nginx_config(folder: Path, ports: ProxyPorts, tls: TlsFiles) -> str:
    """The whole nginx configuration (everything under ``folder``, loopback only).

    Beyond a CA-signed client certificate, the public listener wants *this*
    deployment's operator certificate (its serial): the CA outlives deployments,
    and an ``operator.key`` left in an old results folder must open nothing else.
    """
    temp = folder / "temp"
    operator_serial = certificate_serial(tls.operator_cert)
    return f"""\
daemon off;
master_process on;
worker_processes 1;
pid {folder / "nginx.pid"};
error_log {folder / "error.log"} notice;
events {{ worker_connections 512; }}
http {{
    # Combined format plus total and upstream seconds: what the proxy itself adds.
    log_format timed '$remote_addr [$time_local] "$request" $status $body_bytes_sent '
                     'rt=$request_time urt=$upstream_response_time';
    access_log {folder / "access.log"} timed;
    client_body_temp_path {temp / "body"};
    proxy_temp_path {temp / "proxy"};
    fastcgi_temp_path {temp / "fastcgi"};
    uwsgi_temp_path {temp / "uwsgi"};
    scgi_temp_path {temp / "scgi"};
    client_max_body_size 0;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_read_timeout {PROXY_TIMEOUT_S}s;
    proxy_send_timeout {PROXY_TIMEOUT_S}s;
    proxy_ssl_verify on;
    proxy_ssl_trusted_certificate {tls.ca_cert};
    proxy_ssl_name localhost;
    proxy_ssl_server_name on;
    ssl_certificate {tls.server_cert};
    ssl_certificate_key {tls.server_key};

    upstream superlink {{ server {ports.address(ports.superlink)}; keepalive 16; }}
    upstream public {{ server {ports.address(ports.public)}; keepalive 16; }}

    # Public address: the Fleet API for nodes; anything else needs the
    # operator's client certificate (signed by the CA, for client auth, this one).
    server {{
        listen {ports.address(ports.public)} ssl;
        ssl_client_certificate {tls.ca_cert};
        ssl_verify_client optional;
        ssl_verify_depth 1;
        location ^~ {FLEET_ROUTE_PREFIX} {{
            proxy_pass https://superlink;
        }}
        location / {{
            if ($ssl_client_verify != SUCCESS) {{
                return 403 "privfed: without a client certificate only the Fleet API\\n";
            }}
            if ($ssl_client_serial != "{operator_serial}") {{
                return 403 "privfed: not this deployment's operator certificate\\n";
            }}
            proxy_pass https://superlink;
        }}
    }}

    # Operator gateway: the flwr CLI's Control API calls, sent on with the
    # operator's certificate.
    server {{
        listen {ports.address(ports.operator)} ssl;
        location ^~ {CONTROL_ROUTE_PREFIX} {{
            proxy_pass https://public;
            proxy_ssl_certificate {tls.operator_cert};
            proxy_ssl_certificate_key {tls.operator_key};
        }}
        location / {{
            return 404 "privfed: the operator gateway forwards only the Control API\\n";
        }}
    }}
}}
"""


def accepts(host: str, port: int) -> bool:
    """True when something accepts a TCP connection at ``host:port`` within 1 s."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def launch_front_proxy(
    folder: Path, ports: ProxyPorts, tls: TlsFiles, env: dict[str, str]
) -> ManagedProcess:
    """Write the configuration and start nginx in the foreground (not yet waited on).

    The caller records the process at once, to stop it by PID on every path
    (SIGTERM: nginx's fast shutdown, workers included), then calls
    :func:`wait_front_proxy`.
    """
    binary = nginx_binary()
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (folder / "temp" / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "nginx.conf"
    conf.write_text(nginx_config(folder, ports, tls))
    # -e: errors before the configuration is read go here, not to /var/log.
    argv = [binary, "-p", str(folder), "-c", str(conf), "-e", str(folder / "error.log")]
    return ManagedProcess("nginx", argv, env, folder / "nginx.log", folder)


def wait_front_proxy(proc: ManagedProcess, folder: Path, ports: ProxyPorts) -> None:
    """Wait until both listeners accept connections; else a :class:`ProxyError`
    carrying nginx's error log."""
    try:
        wait_until(
            lambda: (
                accepts(ports.host, ports.public) and accepts(ports.host, ports.operator)
            ),
            STARTUP_TIMEOUT,
            "the front proxy to listen",
            proc,
        )
    except (RuntimeError, TimeoutError) as exc:
        log = folder / "error.log"
        errors = log.read_text() if log.exists() else ""
        raise ProxyError(f"{exc}\nnginx error log:\n{errors[-2000:]}") from None
