"""Certified node identities for secure aggregation: Ed25519 keys certified by a CA.

Flower's node ids are assigned by the SuperLink, so they say nothing against an
active server. A node's identity is instead an Ed25519 key it holds, certified by
a CA the server does not control (the deployment's CA, or in a simulation the
launcher acting as a trusted dealer). Everything here is ``cryptography``'s:
Ed25519 signatures and X.509 certificate checks (``verify_directly_issued_by``).

Where a node finds its identity (never in the run config, which the server writes):

- a deployed node: ``<state-dir>/identity/identity.pem`` (its private key, then its
  certificate) and ``<state-dir>/identity/ca.crt`` (the CA it trusts);
- a simulated partition: ``$PRIVFED_SECAGG_DEALER/partition-<id>.pem`` and
  ``$PRIVFED_SECAGG_DEALER/ca.crt``, written by the launcher before any process of
  the run starts.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

DEALER_ENV = "PRIVFED_SECAGG_DEALER"  # a simulation's trusted-dealer folder
IDENTITY_FOLDER = "identity"  # under a deployed node's state-dir
IDENTITY_FILE = "identity.pem"
CA_FILE = "ca.crt"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class IdentityError(ValueError):
    """A certificate or signature does not check, or a node has no identity."""


def partition_file(pid: int) -> str:
    """The dealer's file for simulated partition ``pid``."""
    return f"partition-{pid}.pem"


@dataclass(frozen=True)
class NodeIdentity:
    """A node's Ed25519 signing key and the CA's certificate of its public key."""

    private_key: bytes  # raw 32 bytes
    certificate: bytes  # DER

    def __post_init__(self) -> None:
        if len(self.private_key) != PUBLIC_KEY_BYTES:
            raise IdentityError("an Ed25519 private key has 32 raw bytes")
        mine = Ed25519PrivateKey.from_private_bytes(self.private_key).public_key()
        if certified_key_unchecked(self.certificate) != mine.public_bytes_raw():
            raise IdentityError("the certificate is not for this node's key")

    @property
    def public_key(self) -> bytes:
        """The raw Ed25519 public key: the node's identity."""
        return certified_key_unchecked(self.certificate)

    def sign(self, message: bytes) -> bytes:
        """An Ed25519 signature of ``message``."""
        return Ed25519PrivateKey.from_private_bytes(self.private_key).sign(message)


@dataclass(frozen=True)
class TrustedIdentity:
    """What a node holds: its identity and the CA certificate it checks others with."""

    identity: NodeIdentity
    ca_certificate: bytes  # DER


def certified_key_unchecked(certificate: bytes) -> bytes:
    """The raw Ed25519 key a DER certificate names, without checking who issued it."""
    try:
        cert = x509.load_der_x509_certificate(certificate)
    except ValueError:
        raise IdentityError("not a DER X.509 certificate") from None
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityError("a node identity certificate must certify an Ed25519 key")
    return key.public_bytes_raw()


@functools.lru_cache(maxsize=65536)
def _verified(certificate: bytes, ca_certificate: bytes, day: datetime.date) -> bytes:
    try:
        cert = x509.load_der_x509_certificate(certificate)
        ca = x509.load_der_x509_certificate(ca_certificate)
    except ValueError:
        raise IdentityError("not a DER X.509 certificate") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise IdentityError("the certificate is not signed by this node's CA") from None
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise IdentityError("the certificate is expired or not yet valid")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        raise IdentityError("an identity certificate must say it is no CA") from None
    if constraints.value.ca:
        raise IdentityError("a CA certificate is not a node identity")
    return certified_key_unchecked(certificate)


def verify_certificate(certificate: bytes, ca_certificate: bytes) -> bytes:
    """The certified raw Ed25519 key, if ``certificate`` is the CA's, valid now and no
    CA itself; :class:`IdentityError` otherwise. Cached per day: a simulation
    process checks the same certificates every round."""
    return _verified(certificate, ca_certificate, datetime.date.today())


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is the Ed25519 signature of ``message`` by ``public_key``."""
    if len(signature) != SIGNATURE_BYTES or len(public_key) != PUBLIC_KEY_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def fingerprint(public_key: bytes) -> str:
    """A short name of an identity for logs and refusals."""
    return hashlib.sha256(public_key).hexdigest()[:16]


# -- files -----------------------------------------------------------------------------
def identity_pem(private_key: Ed25519PrivateKey, certificate: x509.Certificate) -> bytes:
    """The file form: the PKCS8 private key, then the certificate, both PEM."""
    key = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key + certificate.public_bytes(serialization.Encoding.PEM)


def read_identity(identity_file: Path, ca_file: Path) -> TrustedIdentity:
    """Load and check a node's identity file and its CA (the certificate must be the
    CA's: a node never signs with an identity others would refuse). Errors name no
    path: a device's refusal reaches the server."""
    try:
        data, ca_pem = identity_file.read_bytes(), ca_file.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read its identity files ({exc.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, None)
        cert = x509.load_pem_x509_certificate(data[data.index(b"-----BEGIN CERT") :])
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise IdentityError("its identity files are not PEM as expected") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError("its identity key is not Ed25519")
    raw = key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    ca_der = ca.public_bytes(serialization.Encoding.DER)
    verify_certificate(der, ca_der)
    return TrustedIdentity(NodeIdentity(raw, der), ca_der)


def identity_files(state_dir: str | None, partition_id: int | None) -> tuple[Path, Path]:
    """Where this node's identity and CA are: its state-dir on a device, the dealer's
    folder (``$PRIVFED_SECAGG_DEALER``) for a simulated partition."""
    if state_dir:
        folder = Path(state_dir).expanduser() / IDENTITY_FOLDER
        return folder / IDENTITY_FILE, folder / CA_FILE
    dealer = os.environ.get(DEALER_ENV)
    if not dealer or partition_id is None:
        raise IdentityError(
            "this node has no certified identity for secure aggregation: a device keeps "
            f"it in <state-dir>/{IDENTITY_FOLDER}/, a simulation gets it from the "
            f"launcher's dealer (${DEALER_ENV})"
        )
    folder = Path(dealer)
    return folder / partition_file(partition_id), folder / CA_FILE
