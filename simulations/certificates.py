"""TLS material and SuperNode keys for a local deployment, made with ``cryptography``.

The private CA (``ca.crt``/``ca.key``) lives in a per-user folder outside any
results folder (:func:`default_ca_dir`; folder 0700, key 0600): whoever holds
``ca.key`` can mint an operator certificate. The certificate folder of a
deployment holds ``ca.crt`` (a copy), ``server.pem``/``server.key`` (the SuperLink
and front proxy's certificate, SAN localhost, 127.0.0.1 and ::1) and
``operator.pem``/``operator.key`` (the client certificate the front proxy asks
for on every route but the Fleet API's). Users may put their own files there: a
complete folder is reused as it is, a partial one is an error. SuperNode
authentication keys are EC NIST P-384 pairs in OpenSSH format, as
``flwr supernode register`` and ``flower-supernode --auth-supernode-private-key``
expect.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TLS_FILES = ("ca.crt", "server.pem", "server.key", "operator.pem", "operator.key")
CA_FILES = ("ca.crt", "ca.key")
# Tests and users who keep the CA elsewhere set this (or pass --ca-dir).
CA_DIR_ENV = "PRIVFED_CA_DIR"
OPERATOR_NAME = "privfed operator"
VALIDITY = datetime.timedelta(days=365)


class CertificateError(RuntimeError):
    """The certificate folder is incomplete or unusable."""


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the CA certificate, the server's and the operator's certificates."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    operator_cert: Path
    operator_key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> TlsFiles:
        """The files of a certificate folder, named as in :data:`TLS_FILES`."""
        return cls(*(folder / name for name in TLS_FILES))


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


def _make_ca(ca_dir: Path) -> None:
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
    _write_private(ca_dir / "ca.key", _pem_key(ca_key))
    (ca_dir / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None = None,
) -> tuple[bytes, bytes]:
    """A leaf certificate for ``usage`` (server or client auth) and its key, as PEM."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP384R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca_key, hashes.SHA384())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _generate(folder: Path, ca_dir: Path) -> None:
    ca_pem = (ca_dir / "ca.crt").read_bytes()
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{ca_dir / 'ca.key'} is not an EC private key")
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    server = _issue(ca_cert, ca_key, "localhost", ExtendedKeyUsageOID.SERVER_AUTH, san)
    operator = _issue(ca_cert, ca_key, OPERATOR_NAME, ExtendedKeyUsageOID.CLIENT_AUTH)
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles.in_folder(folder)
    files.ca_cert.write_bytes(ca_pem)
    files.server_cert.write_bytes(server[0])
    _write_private(files.server_key, server[1])
    files.operator_cert.write_bytes(operator[0])
    _write_private(files.operator_key, operator[1])


def default_ca_dir() -> Path:
    """Where the CA lives: ``$PRIVFED_CA_DIR``, else the user's XDG data folder.

    That is ``$XDG_DATA_HOME/privfed/ca``, or ``~/.local/share/privfed/ca``: one
    CA per user, never inside a results folder that gets copied or shared.
    """
    if os.environ.get(CA_DIR_ENV):
        return Path(os.environ[CA_DIR_ENV]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data).expanduser() / "privfed" / "ca"


def ensure_ca(ca_dir: Path) -> Path:
    """Create the CA in ``ca_dir`` (0700, key 0600) or check the one there.

    A CA folder or key that others can read is refused rather than fixed: the
    key may already have leaked, and the owner should know.
    """
    present = [f for f in CA_FILES if (ca_dir / f).exists()]
    if present and len(present) < len(CA_FILES):
        missing = [f for f in CA_FILES if f not in present]
        raise CertificateError(
            f"CA folder {ca_dir} has {', '.join(present)} but lacks {', '.join(missing)}"
        )
    if not present:
        ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path, mode in ((ca_dir, 0o700), (ca_dir / "ca.key", 0o600)):
        actual = stat.S_IMODE(path.stat().st_mode) if path.exists() else mode
        if actual & 0o077:
            raise CertificateError(
                f"{path} has mode {actual:04o}; others must not read the CA's key: "
                f"chmod {mode:04o} {path} (and make a new CA if it may have leaked)"
            )
    if not present:
        _make_ca(ca_dir)
    return ca_dir


def ensure_tls_files(folder: Path, ca_dir: Path | None = None) -> TlsFiles:
    """Reuse a complete certificate folder, or create one; refuse a partial one.

    New certificates are signed by the CA in ``ca_dir`` (default
    :func:`default_ca_dir`, created if absent). A ``ca.key`` in the certificate
    folder is refused unless that folder *is* the chosen CA folder.
    """
    ca_dir = (ca_dir or default_ca_dir()).expanduser().resolve()
    folder = folder.expanduser().resolve()
    if (folder / "ca.key").exists() and folder != ca_dir:
        raise CertificateError(
            f"{folder / 'ca.key'}: the CA's private key must not sit beside the "
            f"deployment's certificates; move ca.key and ca.crt to {ca_dir} (the CA "
            f"folder) or pass --ca-dir {folder} to keep it there"
        )
    # In a folder that is also the CA folder, ca.crt says nothing about the rest.
    wanted = [f for f in TLS_FILES if folder != ca_dir or f not in CA_FILES]
    present = [f for f in wanted if (folder / f).exists()]
    if present and len(present) < len(wanted):
        missing = [f for f in wanted if f not in present]
        raise CertificateError(
            f"certificate folder {folder} has {', '.join(present)} but lacks "
            f"{', '.join(missing)}; add them, or empty the folder to generate new ones"
        )
    if not present:
        _generate(folder, ensure_ca(ca_dir))
    return TlsFiles.in_folder(folder)


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
