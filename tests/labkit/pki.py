"""Certificates for the lab's charons: a CA and end-entity certificates signed by it, as PEM
files (cryptography)."""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Pki:
    """A certificate and its private key, both as PEM files."""

    identity: str
    cert_path: Path
    key_path: Path
    cert: Any = field(repr=False)
    key: Any = field(repr=False)


def _new_key(kind: str) -> Any:
    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"key kind {kind!r}: use 'ecdsa' or 'rsa'")


def write_pki(identity: str, directory: Path, stem: str, cert: Any, key: Any) -> Pki:
    """Write ``cert`` and ``key`` as ``stem``.crt and ``stem``.key (mode 0600) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return Pki(identity, cert_path, key_path, cert, key)


def make_ca(directory: Path, kind: str = "ecdsa", name: str = "tcpencap lab CA") -> Pki:
    """A self-signed CA certificate valid for a day."""
    key = _new_key(kind)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return write_pki(name, directory, "ca", cert, key)


def make_cert(ca: Pki, identity: str, directory: Path, kind: str = "ecdsa") -> Pki:
    """An end-entity certificate signed by ``ca``; SAN = ``identity`` (IP, email or DNS)."""
    try:
        san: Any = x509.IPAddress(ipaddress.ip_address(identity))
    except ValueError:
        san = x509.RFC822Name(identity) if "@" in identity else x509.DNSName(identity)
    key = _new_key(kind)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
        )
        .sign(ca.key, hashes.SHA256())
    )
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", identity)
    return write_pki(identity, directory, stem, cert, key)
