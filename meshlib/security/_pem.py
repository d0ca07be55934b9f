"""PEM in and out of files: certificates, signing keys, and key files only their owner reads.

Kept apart from the CA so the file rules live in one place: an error names the file
and what is wrong with it but never echoes its content (it may be a key), and a key
file is 0600 from its first byte, never briefly wider.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from .._exceptions import CertificateError

__all__ = [
    "SIGNING_KEY_TYPES",
    "SigningKey",
    "certificates_pem",
    "load_certificates",
    "load_signing_key",
    "private_key_pem",
    "read_file",
    "read_private_file",
    "write_files",
]

SigningKey: TypeAlias = (
    ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
)
"""The keys meshlib signs with (DSA is obsolete; X25519/X448 cannot sign)."""

SIGNING_KEY_TYPES = (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)

_O_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{path}: no such file") from None
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None


def read_private_file(path: Path) -> bytes:
    """Read a key file, refusing it (as ssh does) when group or others may read it.

    The mode is checked on the open file, so the file checked is the file read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise CertificateError(f"{path}: no such file") from None
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    with os.fdopen(fd, "rb") as f:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if os.name == "posix" and mode & 0o077:
            raise CertificateError(
                f"{path}: permissions {mode:04o} are too open: a private key must not be readable by group or "
                f"others; run chmod 600 {path}"
            )
        return f.read()


def load_certificates(data: bytes, source: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(f"{source}: not a PEM certificate (expected -----BEGIN CERTIFICATE-----)") from None


def load_signing_key(data: bytes, source: str) -> SigningKey:
    # The parser's own message is dropped: it may quote what it could not parse.
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateError(
            f"{source}: the key is encrypted; meshlib reads unencrypted keys (protect the file with chmod 600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(f"{source}: not a PEM private key, or one of an unsupported kind") from None
    if not isinstance(key, SIGNING_KEY_TYPES):
        raise CertificateError(f"{source}: a {type(key).__name__} cannot sign certificates; use an EC or RSA key")
    return key


def certificates_pem(*certs: x509.Certificate) -> bytes:
    """Re-encode parsed certificates, so whatever else an input file held never travels on."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def private_key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_files(directory: Path, files: Mapping[str, tuple[bytes, int]]) -> list[Path]:
    """Write ``{name: (data, mode)}`` into ``directory``, replacing each file whole.

    Each file goes to a fresh temporary sibling created with its final mode (``O_EXCL``:
    no one else can have it open), and only when all are written are they renamed into
    place, so a failure leaves the previous files intact and a key is never readable
    by others, not even for an instant.
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for name, (data, mode) in files.items():
            temp = directory / f".{name}.{secrets.token_hex(8)}.tmp"
            fd = os.open(temp, _O_FLAGS, mode)
            temps.append((temp, directory / name))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for temp, final in temps:
            os.replace(temp, final)
    except OSError as exc:
        raise CertificateError(
            f"{directory}: cannot write the CA files ({exc.strerror or type(exc).__name__})"
        ) from None
    finally:
        for temp, _ in temps:
            temp.unlink(missing_ok=True)
    return [final for _, final in temps]
