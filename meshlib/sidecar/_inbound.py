"""The inbound listener's last step: hand an admitted request to the app, with the caller's verified identity.

Everything before it (mTLS per PeerAuthentication, authorization, rate limits, the
caller's deadline) is ``MeshServer`` and ``MeshMiddleware``, the same objects an
in-process service runs. The identity goes to the app in ``x-forwarded-client-cert``,
which ``MeshMiddleware(trusted_sidecars=["127.0.0.1"])`` in the app believes.
"""

from __future__ import annotations

import hashlib
from collections.abc import MutableMapping
from typing import Any

import httpx

from ..client._fasthttp import FastAsyncTransport
from ..mesh import Mesh
from ..server._peer import PEER_EXTENSION, PeerInfo
from ..server._xfcc import HEADER as XFCC
from ._proxy import ASGIBody, error_reply, forward_headers, relay_response, send_error

__all__ = ["AppForwarder"]


class AppForwarder:
    """ASGI app forwarding to the local app at ``address`` (``host:port``) over a kept-alive plain pool."""

    def __init__(self, mesh: Mesh, address: str, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.mesh = mesh
        self.address = address
        self.transport = transport if transport is not None else FastAsyncTransport()
        identity = mesh.identity
        self._by = f"By={identity};" if identity is not None else ""

    async def aclose(self) -> None:
        await self.transport.aclose()

    def _xfcc(self, scope: MutableMapping[str, Any]) -> bytes | None:
        extensions = scope.get("extensions") or {}
        peer = extensions.get(PEER_EXTENSION)
        if not isinstance(peer, PeerInfo) or peer.spiffe_id is None:
            return None
        cert = (extensions.get("tls") or {}).get("client_cert_chain") or ()
        digest = f"Hash={hashlib.sha256(cert[0].encode()).hexdigest()};" if cert else ""
        return f"{self._by}{digest}URI={peer.spiffe_id}".encode()

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        target = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string") or b""
        url = f"http://{self.address}{target.decode('latin-1')}" + (f"?{query.decode('latin-1')}" if query else "")
        headers = forward_headers(scope["headers"], drop=(XFCC,))
        xfcc = self._xfcc(scope)
        if xfcc is not None:
            headers.append((XFCC, xfcc))
        client = scope.get("client")
        if client:
            headers.append((b"x-forwarded-for", str(client[0]).encode()))
        headers.append((b"x-forwarded-proto", b"https" if xfcc is not None else b"http"))
        body = ASGIBody(receive)
        request = httpx.Request(scope["method"], url, headers=headers, stream=body)
        if not any(name in (b"content-length", b"transfer-encoding") for name, _ in scope["headers"]):
            request.stream = httpx.ByteStream(b"")
        elif not any(name == b"content-length" for name, _ in headers):
            request.headers["transfer-encoding"] = "chunked"
        request.extensions["timeout"] = {"connect": 5.0, "read": None, "write": None, "pool": None}
        try:
            response = await self.transport.handle_async_request(request)
        except Exception as exc:
            if body.disconnected:
                return
            status, flag, text = error_reply(exc)
            await send_error(send, status, flag, text, exc)
            return
        await relay_response(response, send)
