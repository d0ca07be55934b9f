"""What both listeners do to pass an HTTP exchange along: hop-by-hop headers, streamed bodies, error answers.

The decisions (route, endpoint, retry, authz, limits) are the engines', reached through
the same transport and middleware the in-process stack uses; this module only moves
bytes between ASGI and httpx, as RFC 9110 says a proxy does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx

from .._exceptions import RateLimitedError, RequestPathError
from ..client._common import FLAGS_EXTENSION

__all__ = ["ASGIBody", "HOP_BY_HOP", "error_reply", "forward_headers", "relay_response"]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Envoy's status for each response flag (its local replies), so callers see what they would behind Envoy.
_STATUS = {"UO": 503, "RL": 429, "UH": 503, "URX": 503, "UT": 504, "NR": 404, "UF": 503, "UC": 503, "DC": 499}


def forward_headers(headers: Iterable[tuple[bytes, bytes]], drop: Iterable[bytes] = ()) -> list[tuple[bytes, bytes]]:
    """The end-to-end headers: hop-by-hop ones and those the ``Connection`` header names removed."""
    pairs = list(headers)
    named = {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == b"connection"
        for token in value.split(b",")
        if token.strip()
    }
    skip = HOP_BY_HOP | named | {d.lower() for d in drop}
    return [(name, value) for name, value in pairs if name.lower() not in skip]


class ASGIBody(httpx.AsyncByteStream):
    """The request body as it arrives from the client, never buffered here (the transport keeps what a retry needs)."""

    def __init__(self, receive: Any) -> None:
        self._receive = receive
        self.disconnected = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                raise httpx.ReadError("the client went away while sending its body")
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


def error_reply(exc: Exception) -> tuple[int, str, bytes]:
    """Status, Envoy response flag and body for a request the proxy could not complete."""
    if isinstance(exc, RequestPathError):
        flag = exc.response_flag
        return _STATUS.get(flag, 503), flag, f"{exc}\n".encode()
    if isinstance(exc, httpx.TimeoutException):
        return 504, "UT", b"upstream request timeout\n"
    if isinstance(exc, httpx.ConnectError):
        return 503, "UF", f"upstream connect error: {exc}\n".encode()
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return 503, "UC", f"upstream connection terminated: {exc}\n".encode()
    return 502, "UC", f"upstream error: {type(exc).__name__}: {exc}\n".encode()


async def send_error(send: Any, status: int, flag: str, body: bytes, exc: Exception | None = None) -> None:
    extra: list[tuple[bytes, bytes]] = []
    if isinstance(exc, RateLimitedError) and exc.retry_after > 0:
        extra.append((b"retry-after", str(max(1, round(exc.retry_after))).encode()))
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"x-meshlib-response-flags", flag.encode()),
                *([(b"x-envoy-overloaded", b"true")] if flag == "UO" else []),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def relay_response(response: httpx.Response, send: Any, extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Stream an upstream answer to the client; a failure mid-body propagates, so the server aborts the connection.

    A truncated body must look truncated: answering anything after the status line went
    out would hand the client a wrong but complete-looking response.
    """
    try:
        headers = forward_headers(response.headers.raw)
        headers.extend(extra)
        flags = response.extensions.get(FLAGS_EXTENSION)
        if flags and flags != "-":  # a local reply of the mesh (fault abort FI, no route NR): say so, as Envoy logs it
            headers.append((b"x-meshlib-response-flags", str(flags).encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        stream = response.stream  # raw, as the upstream sent it: no decoding, no re-chunking
        assert isinstance(stream, httpx.AsyncByteStream)
        async for chunk in stream:
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        await response.aclose()
