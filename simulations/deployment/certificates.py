"""TLS material and SuperNode keys for a local deployment, made with ``cryptography``.

The private CA (``ca.crt``/``ca.key``) lives in a per-user folder outside any
results folder (:func:`default_ca_dir`; folder 0700, key 0600): whoever holds
``ca.key`` can mint an operator certificate. The certificate folder of a
deployment holds ``ca.crt`` (a copy), ``server.pem``/``server.key`` (the SuperLink
and front proxy's certificate, SAN localhost, 127.0.0.1 and ::1, plus the host
names and addresses devices use, ``extra_sans``) and
``operator.pem``/``operator.key`` (the client certificate the front proxy asks
for on every route but the Fleet API's). Users may put their own files there: a
complete folder is reused as it is, a partial one is an error. SuperNode
authentication keys are EC NIST P-384 pairs in OpenSSH format, as
``flwr supernode register`` and ``flower-supernode --auth-supernode-private-key``
expect.

    python -m simulations.deployment.certificates --certs-dir certs \
        --server-san server.example.org
    python -m simulations.deployment.certificates --node-key keys/node-7  # node-7(.pub)
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TLS_FILES = ("ca.crt", "server.pem", "server.key", "operator.pem", "operator.key")
CA_FILES = ("ca.crt", "ca.key")
# Tests and users who keep the CA elsewhere set this (or pass --ca-dir).
CA_DIR_ENV = "PRIVFED_CA_DIR"
OPERATOR_NAME = "privfed operator"
VALIDITY = datetime.timedelta(days=365)
LOOPBACK_SANS = ("localhost", "127.0.0.1", "::1")  # every server certificate has these
# A DNS name (RFC 1123): dot-separated labels of letters, digits and inner hyphens.
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


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


def server_san(text: str) -> x509.GeneralName:
    """A subject alternative name for the server certificate: an IP address
    (v4 or v6) or a DNS host name; anything else is a :class:`CertificateError`."""
    value = text.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.removesuffix(".").split(".")
    if (
        len(value) <= 253
        and all(_DNS_LABEL.match(label) for label in labels)
        and not labels[-1].isdigit()  # 10.0.0 is a broken address, not a name
    ):
        return x509.DNSName(value.removesuffix(".").lower())
    raise CertificateError(
        f"server SAN {text!r}: not an IP address (e.g. 203.0.113.7, 2001:db8::7) or "
        "a DNS host name (letters, digits and hyphens in dot-separated labels, e.g. "
        "superlink.example.org; no wildcards, ports or URLs)"
    )


def _san_text(name: x509.GeneralName) -> str:
    return str(name.value)


def server_sans(extra: Iterable[str] = ()) -> list[x509.GeneralName]:
    """The server certificate's names: the loopback ones, then ``extra`` (each
    checked by :func:`server_san`), without repeats."""
    names: list[x509.GeneralName] = []
    for text in (*LOOPBACK_SANS, *extra):
        name = server_san(text)
        if name not in names:
            names.append(name)
    return names


def certificate_sans(path: Path) -> list[x509.GeneralName]:
    """The subject alternative names of the PEM certificate at ``path``."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value)


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


def certificate_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: CertificatePublicKeyTypes,
    validity: datetime.timedelta,
    *,
    ca: bool,
) -> x509.CertificateBuilder:
    """What every certificate here starts from: names, key, a random serial, a
    validity from five minutes ago (clock skew), and whether it may sign others."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True
        )
    )


def _make_ca(ca_dir: Path) -> None:
    ca_key = ec.generate_private_key(ec.SECP384R1())
    name = _name("privfed local CA")
    ca_cert = (
        certificate_builder(name, name, ca_key.public_key(), VALIDITY, ca=True)
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
    key = ec.generate_private_key(ec.SECP384R1())
    builder = certificate_builder(
        _name(common_name), ca_cert.subject, key.public_key(), VALIDITY, ca=False
    ).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca_key, hashes.SHA384())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _generate(folder: Path, ca_dir: Path, names: Sequence[x509.GeneralName]) -> None:
    ca_pem = (ca_dir / "ca.crt").read_bytes()
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{ca_dir / 'ca.key'} is not an EC private key")
    san = x509.SubjectAlternativeName(list(names))
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


def ensure_tls_files(
    folder: Path, ca_dir: Path | None = None, extra_sans: Sequence[str] = ()
) -> TlsFiles:
    """Reuse a complete certificate folder, or create one; refuse a partial one.

    New certificates are signed by the CA in ``ca_dir`` (default
    :func:`default_ca_dir`, created if absent); the server certificate names the
    loopback addresses and ``extra_sans`` (the host names and addresses devices
    use, see :func:`server_san`). A reused folder whose server certificate lacks
    one of ``extra_sans`` is refused, naming it. A ``ca.key`` in the certificate
    folder is refused unless that folder *is* the chosen CA folder.
    """
    names = server_sans(extra_sans)  # a bad name fails before anything is written
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
    files = TlsFiles.in_folder(folder)
    if not present:
        _generate(folder, ensure_ca(ca_dir), names)
        return files
    has = certificate_sans(files.server_cert)
    missing = [_san_text(n) for n in names[len(LOOPBACK_SANS) :] if n not in has]
    if missing:
        raise CertificateError(
            f"{files.server_cert} does not name {', '.join(missing)} (it names "
            f"{', '.join(_san_text(n) for n in has) or 'nothing'}); empty {folder} "
            "to make new certificates, or put a server certificate there that names "
            "every address the devices use"
        )
    return files


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


def add_certificate_options(p: argparse.ArgumentParser) -> None:
    """``--ca-dir`` and ``--server-san``, worded once for every script."""
    p.add_argument(
        "--ca-dir",
        type=Path,
        help=f"where the CA's key lives (default: ${CA_DIR_ENV}, else "
        "$XDG_DATA_HOME/privfed/ca or ~/.local/share/privfed/ca)",
    )
    p.add_argument(
        "--server-san",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or IP address the devices use to reach the SuperLink "
        "(repeatable); localhost, 127.0.0.1 and ::1 are always named (for "
        "certificates you will reuse on a real server, see docs/deployment.md)",
    )


def main(argv: list[str] | None = None) -> int:
    """Make (or check) a deployment's certificate folder and SuperNode keys."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--certs-dir", type=Path, help="the deployment's certificate folder")
    add_certificate_options(p)
    p.add_argument(
        "--node-key",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="make a SuperNode key pair PATH and PATH.pub (repeatable)",
    )
    args = p.parse_args(argv)
    if args.certs_dir is None and not args.node_key:
        p.error("give --certs-dir, --node-key, or both")
    try:
        if args.certs_dir is not None:
            tls = ensure_tls_files(args.certs_dir, args.ca_dir, args.server_san)
            names = ", ".join(_san_text(n) for n in certificate_sans(tls.server_cert))
            print(f"{tls.server_cert}: names {names}")
            print(f"give devices {tls.ca_cert}; keep the other files on the server")
        for key_path in args.node_key:
            key = ensure_node_key(key_path.parent, key_path.name)
            print(
                f"{key.private_key} (stays on the device), {key.public_key} (register it)"
            )
    except CertificateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
