"""The same service in Starlette: ``MeshMiddleware`` is plain ASGI middleware.

Run it (after ``meshlib ca init ca/``)::

    python examples/server/starlette_app.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import meshlib

HERE = Path(__file__).resolve().parent


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def order(request: Request) -> JSONResponse:
    caller = meshlib.peer_identity(request.scope)
    return JSONResponse({"order": int(request.path_params["order_id"]), "caller": caller.principal if caller else None})


async def reindex(request: Request) -> JSONResponse:
    return JSONResponse({"status": "reindexing"})


def build(mesh: meshlib.Mesh) -> Starlette:
    routes = [
        Route("/health", health),
        Route("/orders/{order_id:int}", order),
        Route("/admin/reindex", reindex, methods=["POST"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(meshlib.MeshMiddleware, mesh=mesh)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the orders service, behind MeshMiddleware, over mTLS")
    parser.add_argument(
        "--ca", default=HERE.parents[1] / "ca", help="a `meshlib ca init` folder (default: ca/ at the root)"
    )
    parser.add_argument("--port", type=int, default=8443, help="default %(default)s")
    args = parser.parse_args()
    mesh = meshlib.Mesh.from_files(HERE / "mesh.yaml", workload="orders", ca=args.ca)
    meshlib.serve(build(mesh), mesh=mesh, host="127.0.0.1", port=args.port)
