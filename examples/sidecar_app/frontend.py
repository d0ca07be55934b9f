"""The frontend: a plain Starlette app with no meshlib import, calling the backend through ``HTTP_PROXY``.

It calls ``http://backend/hello`` with an ordinary ``httpx.AsyncClient``, which sends
it to the proxy named by ``HTTP_PROXY``: the frontend's sidecar, whose outbound side
routes ``backend`` by the mesh's policy and originates mTLS with the frontend's
identity. Nothing in this file knows any of that.

    HTTP_PROXY=http://127.0.0.1:15001 python examples/sidecar_app/frontend.py --port 8080
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def home(request: Request) -> JSONResponse:
    async with httpx.AsyncClient() as client:  # trust_env: HTTP_PROXY applies
        r = await client.get("http://backend/hello")
    return JSONResponse(
        {
            "service": "frontend",
            "meshlib_loaded": "meshlib" in sys.modules,
            "via": os.environ.get("HTTP_PROXY"),
            "backend_status": r.status_code,
            "backend": r.json() if r.headers.get("content-type") == "application/json" else r.text,
        }
    )


app = Starlette(routes=[Route("/", home)])

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the frontend app (no meshlib)")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (default)")
    args = parser.parse_args()
    sock = socket.socket()
    sock.bind(("127.0.0.1", args.port))
    print(f"frontend listening on 127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off")).run(sockets=[sock])
