"""``/metrics`` as a plain ASGI app, so every server mounts the same one.

The middleware, the sidecar's admin port and the control plane all serve a
registry; a bare ASGI callable mounts under any framework (Starlette's
``Mount("/metrics", app)``) or routes by hand, and needs none of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

__all__ = ["metrics_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def metrics_app(registry: CollectorRegistry) -> ASGIApp:
    """An ASGI app answering GET and HEAD on any path with ``registry`` in Prometheus text format.

    ``Accept: application/openmetrics-text`` gets OpenMetrics (Prometheus asks for it
    when it wants exemplars and ``_created`` as metadata). Other methods get 405.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise RuntimeError(f"metrics_app serves http, not {scope['type']}")
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await _answer(send, 405, b"method not allowed\n", b"text/plain; charset=utf-8", (b"allow", b"GET, HEAD"))
            return
        accept = ""
        for name, value in scope.get("headers") or ():
            if name.lower() == b"accept":
                accept = value.decode("latin-1")
                break
        encoder, content_type = choose_encoder(accept)
        # The collectors read engine state and do no IO: cheap enough to run on the event loop.
        body = encoder(registry)
        await _answer(send, 200, b"" if method == "HEAD" else body, content_type.encode("latin-1"), length=len(body))

    return app


async def _answer(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    *extra: tuple[bytes, bytes],
    length: int | None = None,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body) if length is None else length).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    """Run standalone (``uvicorn ...:app``), the app has nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
