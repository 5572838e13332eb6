"""TLS files and SuperNode keys made by the project's own code."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from simulations.certificates import CertificateError, ensure_node_key, ensure_tls_files


def test_server_certificate_is_signed_by_the_ca_for_loopback(tmp_path: Path) -> None:
    """The server certificate names localhost/127.0.0.1/::1 and verifies against the CA."""
    tls = ensure_tls_files(tmp_path)
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in ips and ipaddress.ip_address("::1") in ips
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(tls.server_key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_private_keys_are_owner_only(tmp_path: Path) -> None:
    """Private keys are written 0600."""
    ensure_tls_files(tmp_path)
    pair = ensure_node_key(tmp_path / "keys", "node-0")
    for path in (tmp_path / "ca.key", tmp_path / "server.key", pair.private_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_existing_folder_is_reused_and_partial_one_refused(tmp_path: Path) -> None:
    """A complete folder (e.g. the user's own) is kept as is; a partial one is an error."""
    ensure_tls_files(tmp_path)
    before = (tmp_path / "server.pem").read_bytes()
    ensure_tls_files(tmp_path)
    assert (tmp_path / "server.pem").read_bytes() == before
    (tmp_path / "server.key").unlink()
    with pytest.raises(CertificateError, match="lacks server.key"):
        ensure_tls_files(tmp_path)


def test_node_keys_are_p384_openssh(tmp_path: Path) -> None:
    """Node keys load as OpenSSH EC P-384 keys, as Flower's register command needs."""
    pair = ensure_node_key(tmp_path, "node-3")
    public = serialization.load_ssh_public_key(pair.public_key.read_bytes())
    private = serialization.load_ssh_private_key(pair.private_key.read_bytes(), None)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP384R1)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert ensure_node_key(tmp_path, "node-3") == pair  # reused, not regenerated
    pair.public_key.unlink()
    with pytest.raises(CertificateError, match="one half"):
        ensure_node_key(tmp_path, "node-3")
