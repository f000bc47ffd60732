"""Provision a federation's keys and certificates with ``cryptography``.

Writes, under one folder:

* ``ca/ca.key``, ``ca/ca.crt``: the federation's certificate authority
  (ECDSA P-256). The key stays with the coordinator, offline if possible.
* ``superlink/server.key``, ``superlink/server.pem``, ``superlink/ca.crt``: the
  SuperLink's TLS certificate, signed by the CA, with the host names and IP
  addresses it is reached by as subject alternative names.
* ``hospitals/<name>/<name>.key``, ``<name>.pub``, ``ca.crt``: one ECDSA P-256
  key pair per hospital in OpenSSH format, the form Flower's node
  authentication reads; the public key is registered at the SuperLink, the
  private key and the CA certificate go to that hospital.

Private keys are created with mode 0600. Existing files are never replaced
unless ``force`` is given: re-running adds what is missing (a new hospital).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass
class Provisioned:
    """Which file was written (or kept) and who it is for."""

    written: list[tuple[Path, str]] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def _write(path: Path, data: bytes, secret: bool, force: bool, result: Provisioned,
           audience: str) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not force:
        result.kept.append(path)
        return False
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    result.written.append((path, audience))
    return True


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an ECDSA key")
    return key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedseg federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    """Subject alternative names: IP addresses as IPs, anything else as DNS names."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def provision(out: Path, hosts: list[str], hospitals: list[str], *, force: bool = False,
              days: int = 825) -> Provisioned:
    """Create (or complete) a federation's CA, SuperLink certificate and hospital keys."""
    if not hosts:
        raise ConfigError("give at least one --host the SuperLink is reached by")
    for name in hospitals:
        if not NAME_RE.match(name):
            raise ConfigError(f"hospital name {name!r}: use letters, digits, '.', '_' or '-'")
    out = Path(out)
    result = Provisioned()
    now = dt.datetime.now(dt.UTC)
    valid_from, valid_to = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key_path, ca_crt_path = out / "ca" / "ca.key", out / "ca" / "ca.crt"
    new_ca = force or not ca_key_path.exists()
    ca_key = ec.generate_private_key(ec.SECP256R1()) if new_ca else _load_key(ca_key_path)
    _write(ca_key_path, _key_pem(ca_key), True, force, result, "coordinator only (keep offline)")
    if new_ca or not ca_crt_path.exists():
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("fedseg federation CA"))
            .issuer_name(_name("fedseg federation CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid_from)
            .not_valid_after(valid_to)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write(ca_crt_path, ca_cert.public_bytes(serialization.Encoding.PEM), False, True,
               result, "everyone (public)")
    else:
        ca_cert = x509.load_pem_x509_certificate(ca_crt_path.read_bytes())
        result.kept.append(ca_crt_path)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)

    link = out / "superlink"
    if force or new_ca or not (link / "server.pem").exists():
        server_key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(hosts[0]))
            .issuer_name(ca_cert.subject)
            .public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid_from)
            .not_valid_after(valid_to)
            .add_extension(x509.SubjectAlternativeName(san_entries(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write(link / "server.key", _key_pem(server_key), True, True, result,
               "the SuperLink machine")
        _write(link / "server.pem", cert.public_bytes(serialization.Encoding.PEM), False, True,
               result, "the SuperLink machine")
    else:
        result.kept.append(link / "server.pem")
    _write(link / "ca.crt", ca_pem, False, True, result, "the SuperLink machine")

    for name in hospitals:
        folder = out / "hospitals" / name
        _ssh_keypair(folder, name, force, result)
        _write(folder / "ca.crt", ca_pem, False, True, result, f"hospital {name}")
    return result


def _ssh_keypair(folder: Path, name: str, force: bool, result: Provisioned) -> bool:
    """Write ``<name>.key`` (OpenSSH private, 0600) and ``<name>.pub`` unless the key exists."""
    key_path = folder / f"{name}.key"
    if key_path.exists() and not force:
        result.kept.append(key_path)
        return False
    key = ec.generate_private_key(ec.SECP256R1())
    _write(key_path, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()),
           True, True, result, f"hospital {name} only")
    _write(folder / f"{name}.pub", key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
           False, True, result, f"the coordinator, to register {name}")
    return True


def hospital_keypair(folder: Path, name: str, force: bool = False) -> Provisioned:
    """A hospital's own key pair, for hospitals that make their key themselves
    (the private key then never leaves the hospital)."""
    if not NAME_RE.match(name):
        raise ConfigError(f"hospital name {name!r}: use letters, digits, '.', '_' or '-'")
    result = Provisioned()
    _ssh_keypair(Path(folder), name, force, result)
    return result
