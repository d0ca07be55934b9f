"""The backend: a bare ASGI app with no meshlib import, run behind ``meshlib sidecar``.

Its sidecar terminates the mesh's mTLS, checks the AuthorizationPolicy and forwards
the request here with the verified caller in ``x-forwarded-client-cert``
(``By=<backend's id>;Hash=<cert sha256>;URI=<caller's id>``). The app only reads
that header.

    python examples/sidecar_app/backend.py --port 8081
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any

import uvicorn


def caller(xfcc: str) -> str | None:
    """The ``URI=`` of the last element of an x-forwarded-client-cert header: who the sidecar verified."""
    for part in xfcc.split(",")[-1].split(";"):
        key, _, value = part.partition("=")
        if key.strip().lower() == "uri":
            return value.strip().strip('"')
    return None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    xfcc = headers.get("x-forwarded-client-cert", "")
    body = json.dumps(
        {
            "service": "backend",
            "path": scope["path"],
            "caller": caller(xfcc),
            "x-forwarded-client-cert": xfcc,
            "meshlib_loaded": "meshlib" in sys.modules,
        }
    ).encode()
    headers_out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers_out})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the backend app (no meshlib)")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (default)")
    args = parser.parse_args()
    sock = socket.socket()
    sock.bind(("127.0.0.1", args.port))
    print(f"backend listening on 127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off")).run(sockets=[sock])
