"""Test certificates: a CA with server and client certs it signed, and an unrelated CA."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_IP = "127.0.0.1"
CERT_VALIDITY = datetime.timedelta(days=30)


@dataclass(frozen=True)
class Pki:
    """PEM files of a test CA, a server and a client cert it signed, and an unrelated CA."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca_cert: Path
    rogue_client_cert: Path
    rogue_client_key: Path


@dataclass(frozen=True)
class _Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def generate_test_pki(directory: Path) -> Pki:
    """Write a CA, a server cert for localhost/127.0.0.1, client certs and a rogue CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _make_ca("pumpgw test CA")
    rogue_ca = _make_ca("rogue CA")
    server_names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address(SERVER_IP)),
    ]
    server = _make_leaf(ca, "localhost", ExtendedKeyUsageOID.SERVER_AUTH, server_names)
    client = _make_leaf(ca, "pumpgw test client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    rogue = _make_leaf(rogue_ca, "rogue client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return Pki(
        ca_cert=_write_cert(directory / "ca.crt", ca.cert),
        server_cert=_write_cert(directory / "server.crt", server.cert),
        server_key=_write_key(directory / "server.key", server.key),
        client_cert=_write_cert(directory / "client.crt", client.cert),
        client_key=_write_key(directory / "client.key", client.key),
        rogue_ca_cert=_write_cert(directory / "rogue-ca.crt", rogue_ca.cert),
        rogue_client_cert=_write_cert(directory / "rogue-client.crt", rogue.cert),
        rogue_client_key=_write_key(directory / "rogue-client.key", rogue.key),
    )


def _make_ca(common_name: str) -> _Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        _cert_builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Issuer(cert, key)


def _make_leaf(
    issuer: _Issuer,
    common_name: str,
    purpose: x509.ObjectIdentifier,
    alt_names: list[x509.GeneralName],
) -> _Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _cert_builder(subject, issuer.cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return _Issuer(builder.sign(issuer.key, hashes.SHA256()), key)


def _cert_builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CERT_VALIDITY)
    )


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path
