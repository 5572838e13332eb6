"""Certified node identities for secure aggregation: Ed25519 keys the CA signs.

A node's identity is an Ed25519 key pair it keeps, with a certificate of the
public key issued by a CA the server does not control; nodes sign their key
advertisements and the uploader set with it, and check each other's certificates
against the CA (:mod:`common.secure_aggregation.identity`). Two uses:

- a **deployment**: the CA of :mod:`simulations.deployment.certificates` (or any
  CA folder, ``--ca-dir``) issues ``<state-dir>/identity/identity.pem`` and copies
  its ``ca.crt`` beside it. For the guarantee against an active server, that CA
  must be held by someone other than the server's operator (docs/secure-aggregation.md);
- a **simulation**: the launcher is a trusted dealer — a fresh Ed25519 CA per run
  and one identity per partition in a folder it hands the ClientApps through the
  environment (``$PRIVFED_SECAGG_DEALER``), never through the run config.

    python -m simulations.deployment.node_identity --state-dir nodes/node-0 --ca-dir ca
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from common.secure_aggregation.identity import (
    CA_FILE,
    IDENTITY_FILE,
    IDENTITY_FOLDER,
    identity_pem,
    partition_file,
)
from simulations.deployment.certificates import (
    CertificateError,
    _write_private,
    certificate_builder,
    default_ca_dir,
    ensure_ca,
)

VALIDITY = datetime.timedelta(days=365)
DEALER_VALIDITY = datetime.timedelta(days=7)
CaKey = ec.EllipticCurvePrivateKey | Ed25519PrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privfed node identities"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def issue_identity(
    ca_cert: x509.Certificate, ca_key: CaKey, name: str, validity: datetime.timedelta
) -> bytes:
    """A new Ed25519 identity ``name``, certified by the CA, in its file form."""
    key = Ed25519PrivateKey.generate()
    cert = certificate_builder(
        _name(name), ca_cert.subject, key.public_key(), validity, ca=False
    ).sign(ca_key, None if isinstance(ca_key, Ed25519PrivateKey) else hashes.SHA384())
    return identity_pem(key, cert)


def _dealer_ca() -> tuple[x509.Certificate, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    name = _name("privfed simulation dealer")
    cert = certificate_builder(name, name, key.public_key(), DEALER_VALIDITY, ca=True).sign(
        key, None
    )
    return cert, key


def deal_identities(folder: Path, partitions: int) -> Path:
    """A trusted dealer's folder: a fresh CA (its key is never written) and one
    identity per partition, ``partition-<id>.pem`` (0600)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_cert, ca_key = _dealer_ca()
    (folder / CA_FILE).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for pid in range(partitions):
        data = issue_identity(ca_cert, ca_key, f"partition {pid}", DEALER_VALIDITY)
        _write_private(folder / partition_file(pid), data)
    return folder


def ensure_node_identity(state_dir: Path, ca_dir: Path, name: str) -> Path:
    """``<state-dir>/identity/``: the node's identity certified by the CA in
    ``ca_dir`` and that CA's certificate (reused if both are there)."""
    folder = state_dir / IDENTITY_FOLDER
    identity, ca_copy = folder / IDENTITY_FILE, folder / CA_FILE
    if identity.exists() and ca_copy.exists():
        return folder
    ensure_ca(ca_dir)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey | Ed25519PrivateKey):
        raise CertificateError(f"{ca_dir / 'ca.key'} is not an EC or Ed25519 key")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_private(identity, issue_identity(ca_cert, ca_key, name, VALIDITY))
    ca_copy.write_bytes((ca_dir / "ca.crt").read_bytes())
    return folder


def main(argv: list[str] | None = None) -> int:
    """Issue (or keep) a node's identity in its state folder."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state-dir", type=Path, required=True, help="the node's state-dir")
    p.add_argument(
        "--ca-dir", type=Path, help="the identity CA (default: the deployment's)"
    )
    p.add_argument("--name", default="privfed node", help="the certificate's common name")
    args = p.parse_args(argv)
    try:
        folder = ensure_node_identity(
            args.state_dir, (args.ca_dir or default_ca_dir()).expanduser(), args.name
        )
    except CertificateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{folder / IDENTITY_FILE} (stays on the device), {folder / CA_FILE} (the CA)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
