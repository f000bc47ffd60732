"""Key files both sides make: a hospital's ECDSA P-256 key pair in OpenSSH
form (the form Flower's node authentication reads), written by the
coordinator's ``fedseg provision`` or by the hospital itself (``fedseg
keygen``: the private key then never leaves it).

Private keys are created with mode 0600, from the first byte. Existing files
are never replaced unless ``force`` is given.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass
class Provisioned:
    """Which file was written (or kept) and who it is for."""

    written: list[tuple[Path, str]] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def check_name(name: str) -> None:
    """A hospital's name as files and Flower's node config take it."""
    if not NAME_RE.match(name):
        raise ConfigError(f"hospital name {name!r}: use letters, digits, '.', '_' or '-'")


def write_file(path: Path, data: bytes, secret: bool, force: bool, result: Provisioned,
               audience: str) -> bool:
    """Write ``data`` to ``path`` (0600 when ``secret``, else 0644) unless it
    exists and not ``force``; record either in ``result``. Whether it wrote."""
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


def ssh_keypair(folder: Path, name: str, force: bool, result: Provisioned) -> bool:
    """Write ``<name>.key`` (OpenSSH private, 0600) and ``<name>.pub`` unless the key exists."""
    key_path = folder / f"{name}.key"
    if key_path.exists() and not force:
        result.kept.append(key_path)
        return False
    key = ec.generate_private_key(ec.SECP256R1())
    write_file(key_path, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()),
               True, True, result, f"hospital {name} only")
    write_file(folder / f"{name}.pub", key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
               False, True, result, f"the coordinator, to register {name}")
    return True


def hospital_keypair(folder: Path, name: str, force: bool = False) -> Provisioned:
    """A hospital's own key pair, for hospitals that make their key themselves
    (the private key then never leaves the hospital)."""
    check_name(name)
    result = Provisioned()
    ssh_keypair(Path(folder), name, force, result)
    return result
