"""A local certificate authority (the `cryptography` package): `fleetserve up --tls` and the tests issue every
fleet service, and the CLI, a certificate for loopback with its identity in it."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.tls import Tls

# Names every local certificate is valid for: the fleet's services listen on loopback.
LOOPBACK = ("localhost", "127.0.0.1", "::1")
# Service identity: a URI SAN spiffe://<trust domain>/<name> (and the name as CN).
TRUST_DOMAIN = "fleetserve.local"
CA_DAYS = 365
LEAF_DAYS = 90
# A CA this close to expiry is replaced (and every certificate with it) when a fleet starts.
RENEW_BEFORE = datetime.timedelta(days=30)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write a file that is never readable by others, not even for an instant (created with its mode)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: Iterable[str], identity: str | None) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    if identity:
        names.append(x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/{identity}"))
    return x509.SubjectAlternativeName(names)


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA's key and certificate; issues leaf certificates for servers and clients."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "fleetserve local CA", days: int = CA_DAYS) -> CertificateAuthority:
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
            .not_valid_after(now + datetime.timedelta(days=days))
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
        return cls(key, cert)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: not an EC key")
        return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, identity: str, hosts: Iterable[str] = LOOPBACK, days: int = LEAF_DAYS
    ) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for `identity` (CN and spiffe URI SAN), valid for `hosts` (DNS names or
        IPs), usable by a server and as a client certificate (fleet services are both)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        not_after = min(now + datetime.timedelta(days=days), self.cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_san(hosts, identity), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


class LocalPki:
    """A directory holding a CA (ca.pem; ca.key, mode 0600) and certificates NAME.pem + NAME.key (0600) issued by
    it. The CA is kept across fleet starts (clients that trust ca.pem keep working) until it nears expiry;
    leaf certificates are issued anew on each start."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca_path = directory / "ca.pem"
        self._ca_key_path = directory / "ca.key"
        self._ca: CertificateAuthority | None = None

    def ca(self) -> CertificateAuthority:
        """The CA, loaded from the directory, or created (also when the one there nears expiry)."""
        if self._ca is None:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            ca = None
            if self.ca_path.exists() and self._ca_key_path.exists():
                ca = CertificateAuthority.load(self.ca_path, self._ca_key_path)
                if ca.cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) < RENEW_BEFORE:
                    ca = None
            if ca is None:
                ca = CertificateAuthority.create()
                _write(self._ca_key_path, _key_pem(ca.key), 0o600)
                _write(self.ca_path, ca.cert_pem(), 0o644)
            self._ca = ca
        return self._ca

    def issue(self, identity: str, hosts: Iterable[str] = LOOPBACK, server_name: str = "") -> Tls:
        """Issue `identity` a certificate (files NAME.pem, NAME.key) and return the TLS a process with it uses."""
        cert, key = self.ca().issue(identity, hosts)
        cert_path, key_path = self.dir / f"{identity}.pem", self.dir / f"{identity}.key"
        _write(key_path, key, 0o600)
        _write(cert_path, cert, 0o644)
        return Tls(str(cert_path), str(key_path), str(self.ca_path), server_name)

    def trust_only(self) -> Tls:
        """TLS of a client that verifies servers against this CA and presents no certificate (a public client
        of the gateway)."""
        self.ca()
        return Tls(ca=str(self.ca_path))
