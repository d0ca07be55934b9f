"""The demo's ledger: a plain ASGI app that knows nothing of the mesh.

It imports nothing from meshlib on purpose: the demo runs it as a script
(``python _ledger_app.py --port 0``) behind ``meshlib sidecar``, which gives it mTLS,
authorization, rate limits and metrics without a line of it changing. The only mesh
thing it reads is the ``x-forwarded-client-cert`` header the sidecar adds (the
caller's verified identity), and it reports whether meshlib is loaded in its process,
so the demo can show that it is not.

The demo also serves this same app in-process (wrapped by ``MeshMiddleware``), to
time one service both ways in its latency table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_entries = 0


def caller_from_xfcc(value: str) -> str | None:
    """The ``URI=`` (the caller's SPIFFE id) of the last element of an x-forwarded-client-cert header."""
    if not value:
        return None
    last = value.split(",")[-1]
    for part in last.split(";"):
        key, _, item = part.partition("=")
        if key.strip().lower() == "uri":
            return item.strip().strip('"') or None
    return None


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """``/record`` counts an entry; every path answers JSON with the caller the sidecar verified."""
    global _entries
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    more = True
    while more:  # read the body, if any
        message = await receive()
        more = message["type"] == "http.request" and bool(message.get("more_body"))
    if scope["path"].startswith("/record"):
        _entries += 1
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    body = json.dumps(
        {
            "service": "ledger",
            "entries": _entries,
            "caller": caller_from_xfcc(headers.get("x-forwarded-client-cert", "")),
            "meshlib_loaded": "meshlib" in sys.modules,
            "pid": os.getpid(),
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    """Bind (port 0: any free one), say where, and serve until SIGTERM."""
    import uvicorn

    parser = argparse.ArgumentParser(description="the demo's ledger app (no meshlib)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    print(f"ledger listening on {args.host}:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
