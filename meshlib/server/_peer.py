"""Who is on the other end of a connection, as the app (and the authorization middleware) sees it.

uvicorn puts nothing about TLS in the scope, so the server's protocol wraps the
app per connection: every ``http`` / ``websocket`` scope gets the ASGI TLS
extension (``scope["extensions"]["tls"]``) on a TLS connection, and always
``scope["extensions"]["meshlib.peer"]``, a :class:`PeerInfo`. Both are computed
once per connection, never per request. ``lifespan`` scopes pass through.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from ..policy import SpiffeId
from ..security import peer_spiffe_id

__all__ = ["PEER_EXTENSION", "ConnectionApp", "PeerInfo", "PlaintextApp", "peer_identity", "tls_extensions"]

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

PEER_EXTENSION = "meshlib.peer"
"""The scope extension holding the connection's :class:`PeerInfo`."""

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
_CONNECTION_SCOPES = frozenset({"http", "websocket"})


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """The peer of one connection: its verified SPIFFE id (None without mTLS) and whether mTLS carried it."""

    spiffe_id: SpiffeId | None
    mtls: bool


PLAINTEXT_PEER = PeerInfo(spiffe_id=None, mtls=False)


def peer_identity(scope: MutableMapping[str, Any]) -> SpiffeId | None:
    """The SPIFFE id the caller proved with its client certificate; None for plaintext or outside meshlib.serve."""
    extensions = scope.get("extensions")
    peer = extensions.get(PEER_EXTENSION) if extensions else None
    return peer.spiffe_id if isinstance(peer, PeerInfo) else None


def tls_extensions(ssl_object: ssl.SSLObject | None, server_cert_pem: bytes | None) -> dict[str, Any]:
    """The scope extensions of a TLS connection: ``tls`` (ASGI TLS extension) and ``meshlib.peer``."""
    if ssl_object is None:  # the handshake failed; the app will not be called, but stay safe
        return {PEER_EXTENSION: PLAINTEXT_PEER}
    der = ssl_object.getpeercert(binary_form=True)
    name: str | None = None
    chain: list[str] = []
    if der:
        chain.append(ssl.DER_cert_to_PEM_cert(der))
        name = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    version = ssl_object.version()
    tls = {
        "server_cert": server_cert_pem.decode("ascii") if server_cert_pem else None,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,  # a certificate that fails verification fails the handshake
        "tls_version": _TLS_VERSIONS.get(version or ""),
        "cipher_suite": None,  # Python's ssl names the suite but does not give its 16-bit id
    }
    return {"tls": tls, PEER_EXTENSION: PeerInfo(spiffe_id=peer_spiffe_id(ssl_object), mtls=der is not None)}


def _add(scope: Scope, extensions: dict[str, Any]) -> None:
    present = scope.get("extensions")
    if present is None:
        scope["extensions"] = dict(extensions)
    else:
        present.update(extensions)


class PlaintextApp:
    """The app behind every plaintext connection: says there is no verified peer (one shared instance)."""

    __slots__ = ("_extensions", "app")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._extensions = {PEER_EXTENSION: PLAINTEXT_PEER}

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] in _CONNECTION_SCOPES:
            _add(scope, self._extensions)
        await self.app(scope, receive, send)


class ConnectionApp:
    """The app behind one TLS connection: reads the peer from the handshake on its first request."""

    __slots__ = ("_extensions", "_protocol", "_server_cert", "app")

    def __init__(self, app: ASGIApp, protocol: Any, server_cert_pem: bytes | None) -> None:
        self.app = app
        self._protocol: Any = protocol  # uvicorn's protocol: its ``transport`` is the TLS one once connected
        self._server_cert = server_cert_pem
        self._extensions: dict[str, Any] | None = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] in _CONNECTION_SCOPES:
            extensions = self._extensions
            if extensions is None:
                extensions = self._extensions = tls_extensions(
                    self._protocol.transport.get_extra_info("ssl_object"), self._server_cert
                )
                self._protocol = None  # computed once: drop the reference cycle
            _add(scope, extensions)
        await self.app(scope, receive, send)
