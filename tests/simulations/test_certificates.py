"""TLS files and SuperNode keys made by the project's own code."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from simulations.deployment.certificates import (
    CA_DIR_ENV,
    CertificateError,
    certificate_sans,
    default_ca_dir,
    ensure_node_key,
    ensure_tls_files,
    server_san,
)
from simulations.deployment.certificates import main as certificates_main


def test_server_certificate_is_signed_by_the_ca_for_loopback(tmp_path: Path) -> None:
    """The server certificate names localhost/127.0.0.1/::1 and verifies against the CA."""
    tls = ensure_tls_files(tmp_path / "certs", tmp_path / "ca")
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


def test_operator_certificate_is_for_client_auth_only(tmp_path: Path) -> None:
    """The operator's certificate is signed by the CA for client auth; the server's
    is for server auth only, so nginx will not take it as a client certificate."""
    tls = ensure_tls_files(tmp_path / "certs", tmp_path / "ca")
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    for path, usage in (
        (tls.operator_cert, ExtendedKeyUsageOID.CLIENT_AUTH),
        (tls.server_cert, ExtendedKeyUsageOID.SERVER_AUTH),
    ):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        cert.verify_directly_issued_by(ca)
        assert list(
            cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        ) == [usage], path.name
    key = serialization.load_pem_private_key(tls.operator_key.read_bytes(), password=None)
    operator = x509.load_pem_x509_certificate(tls.operator_cert.read_bytes())
    assert key.public_key().public_numbers() == operator.public_key().public_numbers()


def test_ca_key_stays_in_the_ca_folder_owner_only(tmp_path: Path) -> None:
    """The CA key is written only to the CA folder (0700, key 0600), never beside
    the deployment's certificates; all private keys are 0600."""
    certs, ca_dir = tmp_path / "results" / "certs", tmp_path / "ca"
    tls = ensure_tls_files(certs, ca_dir)
    pair = ensure_node_key(certs / "keys", "node-0")
    assert not list(tmp_path.joinpath("results").rglob("ca.key"))
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    for path in (ca_dir / "ca.key", tls.server_key, tls.operator_key, pair.private_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert (ca_dir / "ca.crt").read_bytes() == tls.ca_cert.read_bytes()
    # A second deployment's certificates come from the same CA.
    other = ensure_tls_files(tmp_path / "other", ca_dir)
    assert other.ca_cert.read_bytes() == tls.ca_cert.read_bytes()


def test_ca_key_in_the_certificate_folder_or_readable_by_others_is_refused(
    tmp_path: Path,
) -> None:
    """A ca.key beside the certificates is refused unless that folder is the chosen
    CA folder; a CA folder or key others can read is refused, naming the path."""
    certs, ca_dir = tmp_path / "certs", tmp_path / "ca"
    ensure_tls_files(certs, ca_dir)
    (certs / "ca.key").write_bytes((ca_dir / "ca.key").read_bytes())
    with pytest.raises(CertificateError, match=r"ca\.key: the CA's private key must not"):
        ensure_tls_files(certs, ca_dir)
    (certs / "ca.key").unlink()

    own = tmp_path / "own"  # the user's explicit choice: CA and certificates together
    tls = ensure_tls_files(own, own)
    assert (own / "ca.key").is_file() and tls.server_cert.is_file()
    assert ensure_tls_files(own, own) == tls

    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    with pytest.raises(CertificateError, match=r"loose has mode 0755.*chmod 0700"):
        ensure_tls_files(tmp_path / "c2", loose)
    (ca_dir / "ca.key").chmod(0o644)
    with pytest.raises(CertificateError, match=r"ca\.key has mode 0644.*chmod 0600"):
        ensure_tls_files(tmp_path / "c3", ca_dir)


def test_default_ca_folder_is_per_user_outside_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$PRIVFED_CA_DIR wins; else $XDG_DATA_HOME/privfed/ca; else ~/.local/share."""
    monkeypatch.setenv(CA_DIR_ENV, str(tmp_path / "chosen"))
    assert default_ca_dir() == tmp_path / "chosen"
    monkeypatch.delenv(CA_DIR_ENV)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_ca_dir() == tmp_path / "xdg" / "privfed" / "ca"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_ca_dir() == tmp_path / "home" / ".local" / "share" / "privfed" / "ca"


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


def test_server_certificate_names_the_extra_host_names_and_addresses(
    tmp_path: Path,
) -> None:
    """--server-san names go into the server certificate beside the loopback ones
    (IPs as IP SANs, host names as DNS SANs, lower-cased, no repeats); a reused
    folder whose certificate lacks one is refused, naming it; nothing else counts
    as a name."""
    extra = ["SuperLink.Example.org", "203.0.113.7", "2001:db8::7", "127.0.0.1"]
    tls = ensure_tls_files(tmp_path / "certs", tmp_path / "ca", extra)
    names = certificate_sans(tls.server_cert)
    cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1", "::1", "203.0.113.7", "2001:db8::7",
    ]  # fmt: skip
    assert len(names) == 6  # 127.0.0.1 once
    assert ensure_tls_files(tmp_path / "certs", tmp_path / "ca", extra[:2]) == tls
    with pytest.raises(CertificateError, match="does not name other.example.org"):
        ensure_tls_files(tmp_path / "certs", tmp_path / "ca", ["other.example.org"])
    for bad in ("https://host", "host:443", "*.example.org", "-bad.example", "10.0.0", ""):
        with pytest.raises(CertificateError, match="server SAN"):
            server_san(bad)
    assert not (tmp_path / "c2").exists()
    with pytest.raises(CertificateError):
        ensure_tls_files(tmp_path / "c2", tmp_path / "ca", ["bad name"])
    assert not (tmp_path / "c2").exists()  # a bad name fails before anything is made


def test_certificates_command_makes_a_folder_and_node_keys(tmp_path: Path) -> None:
    """`python -m simulations.deployment.certificates` (docs/deployment.md's server
    step) makes the folder with the SANs asked for and a node key pair; a bad SAN exits
    2."""
    certs, key = tmp_path / "certs", tmp_path / "keys" / "node-7"
    argv = ["--certs-dir", str(certs), "--ca-dir", str(tmp_path / "ca"),
            "--server-san", "host.example.org", "--node-key", str(key)]  # fmt: skip
    assert certificates_main(argv) == 0
    assert x509.DNSName("host.example.org") in certificate_sans(certs / "server.pem")
    assert key.is_file() and key.with_name("node-7.pub").read_text().startswith(
        "ecdsa-sha2-nistp384 "
    )
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (
        certificates_main(["--certs-dir", str(tmp_path / "x"), "--server-san", "a b"]) == 2
    )


def test_a_node_identity_is_an_ed25519_key_the_deployment_ca_certifies(
    tmp_path: Path,
) -> None:
    """``<state-dir>/identity/``: the node's Ed25519 key and certificate (0600) and the
    CA's certificate; it checks against that CA, is kept on a second call, and one
    certified by another CA does not check."""
    from common.secure_aggregation.identity import (
        IdentityError,
        identity_files,
        read_identity,
        verify_certificate,
        verify_signature,
    )
    from simulations.deployment.node_identity import (
        deal_identities,
        ensure_node_identity,
    )

    state = tmp_path / "node-0"
    folder = ensure_node_identity(state, tmp_path / "ca", "node-0")
    identity_file, ca_file = identity_files(str(state), None)
    assert identity_file.parent == folder
    assert stat.S_IMODE(identity_file.stat().st_mode) == 0o600
    trusted = read_identity(identity_file, ca_file)
    before = identity_file.read_bytes()
    ensure_node_identity(state, tmp_path / "ca", "node-0")
    assert identity_file.read_bytes() == before
    dealer = deal_identities(tmp_path / "dealer", 1)
    other = read_identity(dealer / "partition-0.pem", dealer / "ca.crt")
    with pytest.raises(IdentityError, match="not signed by this node's CA"):
        verify_certificate(other.identity.certificate, trusted.ca_certificate)
    message = b"a key advertisement"
    public = verify_certificate(trusted.identity.certificate, trusted.ca_certificate)
    assert verify_signature(public, trusted.identity.sign(message), message)
    assert not verify_signature(public, other.identity.sign(message), message)


def test_a_resumed_soak_in_a_new_lab_gets_a_certificate_for_its_new_address(
    tmp_path: Path,
) -> None:
    """A resumed soak's lab has a new server address: the harness issues new TLS
    files from the same CA; a fresh run, or a folder holding a CA key, is refused."""
    from types import SimpleNamespace

    from simulations.deployment.fault_run import FaultRun

    ca, certs = tmp_path / "ca", tmp_path / "run" / "certs"
    ensure_tls_files(certs, ca, ["10.1.0.2"])
    run = object.__new__(FaultRun)  # only what the certificate step reads
    run.lab = SimpleNamespace(server=SimpleNamespace(address="10.2.0.2"))
    run.certs, run.ca_dir = certs, ca
    run.args = SimpleNamespace(resume=None)
    with pytest.raises(CertificateError, match="does not name 10.2.0.2"):
        run._certificates_for_this_lab()
    run.args = SimpleNamespace(resume=str(tmp_path / "run"))
    run._certificates_for_this_lab()
    sans = certificate_sans(certs / "server.pem")
    assert server_san("10.2.0.2") in sans and server_san("10.1.0.2") not in sans
    assert (certs / "ca.crt").read_bytes() == (ca / "ca.crt").read_bytes()
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    server.verify_directly_issued_by(ca_cert)  # the nodes' trust still holds
    run.lab = SimpleNamespace(server=SimpleNamespace(address="10.3.0.2"))
    (certs / "ca.key").write_bytes(b"not here")
    with pytest.raises(CertificateError, match="ca.key"):
        run._certificates_for_this_lab()  # never emptied: refused, naming the key
    assert (certs / "server.pem").exists()
