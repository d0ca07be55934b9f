"""A FastAPI service behind the mesh: mTLS, AuthorizationPolicy and rate limits, no code in the handlers.

Run it (after ``meshlib ca init ca/``)::

    python examples/server/fastapi_app.py

and call it from another mesh workload (``mesh.async_client()``) or with curl and a
workload certificate. Who called is ``meshlib.peer_identity(request.scope)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastapi import FastAPI, Request

import meshlib

HERE = Path(__file__).resolve().parent


def build(mesh: meshlib.Mesh) -> meshlib.MeshMiddleware:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/orders/{order_id}")
    async def order(order_id: int, request: Request) -> dict[str, object]:
        caller = meshlib.peer_identity(request.scope)
        return {"order": order_id, "caller": caller.principal if caller else None}

    @app.post("/admin/reindex")
    async def reindex() -> dict[str, str]:
        return {"status": "reindexing"}

    return meshlib.MeshMiddleware(app, mesh=mesh)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the orders service, behind MeshMiddleware, over mTLS")
    parser.add_argument(
        "--ca", default=HERE.parents[1] / "ca", help="a `meshlib ca init` folder (default: ca/ at the root)"
    )
    parser.add_argument("--port", type=int, default=8443, help="default %(default)s")
    args = parser.parse_args()
    mesh = meshlib.Mesh.from_files(HERE / "mesh.yaml", workload="orders", ca=args.ca)
    meshlib.serve(build(mesh), mesh=mesh, host="127.0.0.1", port=args.port)
