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
  private key and the CA certificate go to that hospital (``common/keys.py``
  makes the pair; a hospital's own ``fedseg keygen`` uses the same code).

Private keys are created with mode 0600. Existing files are never replaced
unless ``force`` is given: re-running adds what is missing (a new hospital).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError
from common.keys import Provisioned, check_name, ssh_keypair, write_file


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
        check_name(name)
    out = Path(out)
    result = Provisioned()
    now = dt.datetime.now(dt.UTC)
    valid_from, valid_to = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key_path, ca_crt_path = out / "ca" / "ca.key", out / "ca" / "ca.crt"
    new_ca = force or not ca_key_path.exists()
    ca_key = ec.generate_private_key(ec.SECP256R1()) if new_ca else _load_key(ca_key_path)
    write_file(ca_key_path, _key_pem(ca_key), True, force, result,
               "coordinator only (keep offline)")
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
        write_file(ca_crt_path, ca_cert.public_bytes(serialization.Encoding.PEM), False, True,
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
        write_file(link / "server.key", _key_pem(server_key), True, True, result,
                   "the SuperLink machine")
        write_file(link / "server.pem", cert.public_bytes(serialization.Encoding.PEM), False,
                   True, result, "the SuperLink machine")
    else:
        result.kept.append(link / "server.pem")
    write_file(link / "ca.crt", ca_pem, False, True, result, "the SuperLink machine")

    for name in hospitals:
        folder = out / "hospitals" / name
        ssh_keypair(folder, name, force, result)
        write_file(folder / "ca.crt", ca_pem, False, True, result, f"hospital {name}")
    return result
