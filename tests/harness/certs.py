"""Real X.509 certificates for the TLS tests, made with `cryptography`: a CA,
node certificates it signs (server and client auth, for the names and
addresses given), and a directory in cert-manager's Secret layout (tls.crt,
tls.key, ca.crt) mounted the way the kubelet mounts a Secret: the files are
symlinks through `..data` to a timestamped directory, and an update writes a
new directory and swaps `..data` atomically (`write_secret`).

Used by tests/integration/test_tls.py, the TLS mode of the harness
(tests/harness/processes.py) and bench/ (--tls). Imports no pytest.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.harness.processes import TlsMode

VALIDITY = datetime.timedelta(days=2)  # long enough for any test run, short enough to never matter


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM bytes."""

    cert_pem: bytes
    key_pem: bytes
    serial: int


@dataclass(frozen=True)
class Authority:
    """A CA that signs node certificates."""

    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
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
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(name=name, cert=cert, key=key)

    def issue(self, common_name: str, *, dns: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ()) -> Issued:
        """A leaf certificate for server and client auth, naming dns and ips."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return Issued(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=key_pem, serial=serial)


def write_secret(directory: Path, *, issued: Issued, ca_pem: bytes) -> Path:
    """Write (or replace) tls.crt, tls.key and ca.crt in directory the way the
    kubelet updates a mounted Secret: a new timestamped directory, then an
    atomic rename of the `..data` symlink onto it. Returns directory."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / f"..{time.time_ns()}"
    stamp.mkdir()
    for name, data in (("tls.crt", issued.cert_pem), ("tls.key", issued.key_pem), ("ca.crt", ca_pem)):
        (stamp / name).write_bytes(data)
    staging = directory / "..data_tmp"
    if staging.is_symlink():
        staging.unlink()
    staging.symlink_to(stamp.name)
    os.replace(staging, directory / "..data")  # the atomic step: every file flips at once
    for name in ("tls.crt", "tls.key", "ca.crt"):
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    return directory


def node_flags(directory: Path, *, peer_tls: bool = True, client_cert_auth: bool = False) -> list[str]:
    """The `kvstore node` flags that serve with the Secret in directory."""
    flags = [
        "--tls-cert",
        str(directory / "tls.crt"),
        "--tls-key",
        str(directory / "tls.key"),
        "--tls-ca",
        str(directory / "ca.crt"),
    ]
    if peer_tls:
        flags.append("--peer-tls")
    if client_cert_auth:
        flags.append("--client-cert-auth")
    return flags


def tls_mode(root: Path, *, authority: Authority | None = None, client_cert_auth: bool = False) -> TlsMode:
    """The harness's TLS mode (tests/harness/processes.py): every node gets
    its own certificate for 127.0.0.1 and localhost from one CA, in its own
    Secret directory root/<node id>, and mutual TLS between nodes; the
    harness's client context trusts the CA and presents a client certificate."""
    ca = authority or Authority.create("kvstore-test-ca")

    def node_args(node_id: str) -> list[str]:
        directory = root / node_id
        if not (directory / "tls.crt").exists():
            write_secret(directory, issued=ca.issue(node_id, ips=("127.0.0.1",)), ca_pem=ca.cert_pem)
        return node_flags(directory, client_cert_auth=client_cert_auth)

    client = write_secret(root / "client", issued=ca.issue("kvstore-test-client"), ca_pem=ca.cert_pem)
    return TlsMode(node_args=node_args, context=client_context(client))


def client_context(directory: Path) -> ssl.SSLContext:
    """A client context from a Secret directory: trusts its ca.crt, presents its tls.crt."""
    context = ssl.create_default_context(cafile=str(directory / "ca.crt"))
    context.load_cert_chain(str(directory / "tls.crt"), str(directory / "tls.key"))
    return context
