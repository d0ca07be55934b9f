"""The outbound listener: the app's HTTP proxy, sending each request through the mesh's own transport.

An unchanged app reaches it with ``HTTP_PROXY=http://127.0.0.1:15001`` (absolute-form
requests, as httpx, requests, aiohttp and curl send to a proxy) or by sending a plain
request with a mesh ``Host``. Either way the request goes to ``AsyncMeshTransport``: the
route, endpoint, retries, breaker, ejections, limits, deadline, mTLS, metrics and spans
are exactly the in-process client's, not a copy of them.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import httpx

from ..client import AsyncMeshTransport
from ..mesh import Mesh
from ._proxy import ASGIBody, error_reply, forward_headers, relay_response, send_error

__all__ = ["OutboundProxy"]

_NO_BODY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})


class OutboundProxy:
    """ASGI app: one plain-HTTP request in, the mesh's answer (or Envoy's local reply) out."""

    def __init__(self, mesh: Mesh, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.mesh = mesh
        self.transport = transport if transport is not None else AsyncMeshTransport(mesh)

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # served with lifespan off; websockets through the proxy are not supported
        method = scope["method"]
        if method == "CONNECT":
            await send_error(
                send,
                405,
                "",
                b"the sidecar proxies plain HTTP (mesh mTLS is its job): send http:// URLs, not CONNECT tunnels\n",
            )
            return
        host = _authority(scope)
        if host is None:
            await send_error(send, 400, "", b"no Host header: the sidecar routes by the mesh host\n")
            return
        target = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string") or b""
        url = f"http://{host}{target.decode('latin-1')}" + (f"?{query.decode('latin-1')}" if query else "")
        headers = forward_headers(scope["headers"])
        has_body = method not in _NO_BODY_METHODS or any(
            name in (b"content-length", b"transfer-encoding") for name, _ in scope["headers"]
        )
        body = ASGIBody(receive)
        request = httpx.Request(method, url, headers=headers, stream=body if has_body else httpx.ByteStream(b""))
        if has_body and not any(name == b"content-length" for name, _ in headers):
            request.headers["transfer-encoding"] = "chunked"  # forwarded as it came: streamed, not buffered
        try:
            response = await self.transport.handle_async_request(request)
        except Exception as exc:
            if body.disconnected:
                return  # the client left; nobody to answer (Envoy's DC)
            status, flag, text = error_reply(exc)
            await send_error(send, status, flag, text, exc)
            return
        await relay_response(response, send)


def _authority(scope: MutableMapping[str, Any]) -> str | None:
    """The mesh host of a proxy request: its ``Host`` header (uvicorn keeps the absolute URI's path only)."""
    for name, value in scope["headers"]:
        if name == b"host":
            text = value.decode("latin-1").strip()
            return text or None
    return None
