"""TLS material and SuperNode keys for a local deployment, made with ``cryptography``.

The certificate folder holds ``ca.crt``/``ca.key`` (a private CA) and
``server.pem``/``server.key`` (the SuperLink's certificate, SAN localhost,
127.0.0.1 and ::1). Users may put their own files there: a complete folder is
reused as it is, a partial one is an error. SuperNode authentication keys are EC
NIST P-384 pairs in OpenSSH format, as ``flwr supernode register`` and
``flower-supernode --auth-supernode-private-key`` expect.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TLS_FILES = ("ca.crt", "ca.key", "server.pem", "server.key")
VALIDITY = datetime.timedelta(days=365)


class CertificateError(RuntimeError):
    """The certificate folder is incomplete or unusable."""


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the CA certificate and the server certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privfed local deployment"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _generate(folder: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("privfed local CA"))
        .issuer_name(_name("privfed local CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    folder.mkdir(parents=True, exist_ok=True)
    _write_private(folder / "ca.key", _pem_key(ca_key))
    _write_private(folder / "server.key", _pem_key(server_key))
    (folder / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(
        server_cert.public_bytes(serialization.Encoding.PEM)
    )


def ensure_tls_files(folder: Path) -> TlsFiles:
    """Reuse a complete certificate folder, or create one; refuse a partial one."""
    present = [f for f in TLS_FILES if (folder / f).exists()]
    if present and len(present) < len(TLS_FILES):
        missing = [f for f in TLS_FILES if f not in present]
        raise CertificateError(
            f"certificate folder {folder} has {', '.join(present)} but lacks "
            f"{', '.join(missing)}; add them, or empty the folder to generate new ones"
        )
    if not present:
        _generate(folder)
    return TlsFiles(folder / "ca.crt", folder / "server.pem", folder / "server.key")


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's OpenSSH key pair."""

    private_key: Path
    public_key: Path


def ensure_node_key(folder: Path, name: str) -> NodeKey:
    """An EC P-384 OpenSSH key pair ``<name>`` / ``<name>.pub`` (reused if present)."""
    private, public = folder / name, folder / f"{name}.pub"
    if private.exists() and public.exists():
        return NodeKey(private, public)
    if private.exists() or public.exists():
        raise CertificateError(f"{folder} holds only one half of the key pair '{name}'")
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return NodeKey(private, public)
