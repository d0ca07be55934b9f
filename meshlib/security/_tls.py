"""TLS contexts for the mesh's mTLS, and the SPIFFE check of the peer.

Python's ``ssl`` verifies a chain and a host name, not a SPIFFE id. The check of
the id goes into the handshake itself: contexts made here build ``SSLObject`` /
``SSLSocket`` subclasses whose ``do_handshake`` verifies the peer's URI SAN
before a byte of the request is written. That works under any transport (meshlib's
own, httpcore's, asyncio's or uvloop's TLS) because they all wrap through the
context. A peer that fails the check raises ``PeerIdentityError``, an
``ssl.SSLCertVerificationError``, which httpx reports as ``ConnectError``.

The private key never touches the file system: ``ssl`` only loads keys from
paths, so it is handed over through an anonymous memory file (``memfd``) where
the platform has one, and otherwise through a 0600 temporary file holding the key
encrypted under a random one-time password, removed at once.
"""

from __future__ import annotations

import logging
import os
import secrets
import ssl
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from .._exceptions import CertificateError, SecurityError
from ..policy import SpiffeId

__all__ = [
    "ALPN",
    "CheckedSSLObject",
    "CheckedSSLSocket",
    "PeerCheck",
    "PeerIdentityError",
    "client_context",
    "load_identity",
    "peer_spiffe_id",
    "server_context",
    "uri_sans",
]

log = logging.getLogger("meshlib.security")

ALPN = ["http/1.1"]


class PeerIdentityError(SecurityError, ssl.SSLCertVerificationError):
    """The peer's certificate chains to the mesh's roots but names the wrong identity."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.reason = "SPIFFE_ID_MISMATCH"
        self.verify_message = message

    def __str__(self) -> str:
        return self.verify_message


@dataclass(frozen=True, slots=True)
class PeerCheck:
    """What the peer's certificate must name: a SPIFFE id in one of ``trust_domains``,
    and (when ``identities`` is not empty) one of those URIs."""

    trust_domains: frozenset[str]
    identities: frozenset[str] = frozenset()
    who: str = "peer"
    """``server`` or ``client``, for messages."""

    def verify(self, cert: dict[str, Any] | None) -> SpiffeId:
        uris = uri_sans(cert)
        if not uris:
            raise PeerIdentityError(f"the {self.who}'s certificate carries no SPIFFE id (no URI SAN)")
        if len(uris) > 1:
            raise PeerIdentityError(f"the {self.who}'s certificate carries {len(uris)} URI SANs; a workload has one")
        uri = uris[0]
        try:
            spiffe = SpiffeId(uri)
        except ValueError:
            raise PeerIdentityError(f"the {self.who} presented {uri!r}, which is not a workload SPIFFE id") from None
        if spiffe.trust_domain not in self.trust_domains:
            raise PeerIdentityError(
                f"the {self.who} presented {spiffe}, from trust domain {spiffe.trust_domain!r}; "
                f"this mesh trusts {', '.join(sorted(self.trust_domains))}"
            )
        if self.identities and spiffe not in self.identities:
            raise PeerIdentityError(
                f"the {self.who} presented {spiffe}; expected {' or '.join(sorted(self.identities))}"
            )
        return spiffe


def uri_sans(cert: dict[str, Any] | None) -> list[str]:
    """The URI SANs of a certificate as ``SSLObject.getpeercert()`` returns it."""
    if not cert:
        return []
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]


def peer_spiffe_id(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> SpiffeId | None:
    """The verified SPIFFE id of a connection's peer (None: no TLS, no certificate, not SPIFFE)."""
    if ssl_object is None:
        return None
    checked = getattr(ssl_object, "meshlib_peer", None)
    if isinstance(checked, SpiffeId):
        return checked
    uris = uri_sans(ssl_object.getpeercert())
    if len(uris) != 1:
        return None
    try:
        return SpiffeId(uris[0])
    except ValueError:
        return None


def _check(obj: ssl.SSLObject | ssl.SSLSocket) -> None:
    check: Any = getattr(obj.context, "meshlib_peer_check", None)
    if check is None:
        return
    try:
        obj.meshlib_peer = check.verify(obj.getpeercert())  # type: ignore[union-attr]
    except PeerIdentityError as exc:
        log.warning("meshlib: refused a TLS connection: %s", exc)
        raise


class CheckedSSLObject(ssl.SSLObject):
    """An ``SSLObject`` (asyncio, uvloop) that runs the context's peer check when the handshake ends."""

    meshlib_peer: SpiffeId | None = None

    def do_handshake(self) -> None:
        super().do_handshake()
        _check(self)


class CheckedSSLSocket(ssl.SSLSocket):
    """The blocking-socket twin of ``CheckedSSLObject`` (httpx's sync transport)."""

    meshlib_peer: SpiffeId | None = None

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _check(self)


def _base(context: ssl.SSLContext, bundle_pem: bytes, check: PeerCheck | None) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(ALPN)
    try:
        context.load_verify_locations(cadata=bundle_pem.decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
        raise CertificateError(f"the trust bundle cannot be loaded: {exc}") from None
    if check is not None:
        context.sslobject_class = CheckedSSLObject
        context.sslsocket_class = CheckedSSLSocket
        context.meshlib_peer_check = check  # type: ignore[attr-defined]
    return context


def server_context(
    chain_pem: bytes, key: PrivateKeyTypes, bundle_pem: bytes, trust_domains: Iterable[str]
) -> ssl.SSLContext:
    """A server context that requires a client certificate from the mesh (mTLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _base(context, bundle_pem, PeerCheck(frozenset(trust_domains), who="client"))
    load_identity(context, chain_pem, key)
    return context


def client_context(chain_pem: bytes, key: PrivateKeyTypes, bundle_pem: bytes, check: PeerCheck) -> ssl.SSLContext:
    """A client context for ISTIO_MUTUAL: the workload's certificate, and a SPIFFE check instead of host names."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the peer is checked by its SPIFFE id, not by a DNS name
    _base(context, bundle_pem, check)
    load_identity(context, chain_pem, key)
    return context


def load_identity(context: ssl.SSLContext, chain_pem: bytes, key: PrivateKeyTypes) -> None:
    """Load a certificate chain and its key into ``context`` without writing the key to disk in the clear."""
    if hasattr(os, "memfd_create"):
        clear = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.memfd_create("meshlib-identity", os.MFD_CLOEXEC)
        try:
            _write_all(fd, chain_pem + clear)
            _load(context, f"/proc/self/fd/{fd}", None, None)
            return
        except FileNotFoundError:
            pass  # no /proc: fall through to the encrypted temporary file
        finally:
            os.close(fd)
    password = secrets.token_bytes(32)
    sealed = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(password)
    )
    with tempfile.TemporaryDirectory(prefix="meshlib-") as folder:  # created 0700
        path = os.path.join(folder, "identity.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, chain_pem + sealed)
        finally:
            os.close(fd)
        _load(context, path, None, password)


def _load(context: ssl.SSLContext, certfile: str, keyfile: str | None, password: bytes | None) -> None:
    try:
        context.load_cert_chain(certfile, keyfile, password)
    except ssl.SSLError as exc:
        # The OpenSSL reason only (e.g. KEY_VALUES_MISMATCH): never the file's contents.
        raise CertificateError(f"the workload certificate and key cannot be used together: {exc.reason}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
