"""X.509 for the broker's mutual TLS: a private CA, a server certificate, client certificates.

Uses ``cryptography`` (ECDSA P-256, which every TLS stack including Go's and macOS's
accepts). Certificates are checked on load so a broken or foreign file is named with
the fix instead of surfacing later as an opaque TLS handshake failure.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from security.errors import CertificateError
from security.keys import read_private_file, write_private_file

CA_DAYS = 3650
LEAF_DAYS = 825


@dataclass(frozen=True)
class CertifiedKey:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Multi-Agent Assistant"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(common_name: str = "mas-ca") -> CertifiedKey:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertifiedKey(cert, key)


def issue_certificate(
    ca: CertifiedKey, common_name: str, *, server_names: tuple[str, ...] = (), client: bool
) -> CertifiedKey:
    """A leaf for a client identity (``client=True``) or the server (with DNS/IP names)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usage = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if server_names:
        sans: list[x509.GeneralName] = []
        for name in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return CertifiedKey(builder.sign(ca.key, hashes.SHA256()), key)


def save(pair: CertifiedKey, cert_path: Path, key_path: Path) -> None:
    key_pem = pair.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_file(key_path, key_pem)
    write_private_file(cert_path, pair.cert.public_bytes(serialization.Encoding.PEM))


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(read_private_file(path))
    except ValueError as exc:
        raise CertificateError(f"{path}: not a PEM certificate ({exc})") from exc


def load(cert_path: Path, key_path: Path) -> CertifiedKey:
    cert = load_certificate(cert_path)
    try:
        cert_public = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateError(f"{cert_path}: unsupported public key ({exc})") from exc
    if not isinstance(cert_public, ec.EllipticCurvePublicKey):
        raise CertificateError(f"{cert_path}: expected a certificate for an EC (P-256) key, "
                               f"not {type(cert_public).__name__}")
    try:
        key = serialization.load_pem_private_key(read_private_file(key_path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertificateError(f"{key_path}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key_path}: expected an EC private key")
    if key.public_key().public_numbers() != cert_public.public_numbers():
        raise CertificateError(f"{key_path} does not belong to {cert_path}")
    return CertifiedKey(cert, key)


def check_issued_by(cert: x509.Certificate, ca: x509.Certificate, cert_path: Path) -> None:
    """Raise unless ``cert`` was signed by ``ca`` and is valid now."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateError(f"{cert_path} was not issued by this install's CA") from exc
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertificateError(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
