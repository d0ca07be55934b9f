"""One replica of the ``orders`` service: Starlette behind ``MeshMiddleware``, served by ``meshlib.serve``.

    python examples/global_rate_limit/replica.py --name a --port 8001 --redis redis://127.0.0.1:6379/0

The app has no rate-limit code: the RateLimitPolicy in ``mesh/orders.yaml`` is enforced
by the middleware before the app runs, counting in the Redis given by ``--redis``
(which replaces the policy's ``backend.storage``), so every replica started with the
same Redis shares the same limit. ``run.py`` starts two and calls both.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import meshlib

HERE = Path(__file__).resolve().parent


def policy(redis_url: str) -> list[dict[str, Any]]:
    """mesh/orders.yaml, with every GLOBAL backend counting in ``redis_url``."""
    docs = [d for d in yaml.safe_load_all((HERE / "mesh" / "orders.yaml").read_text()) if d]
    for doc in docs:
        backend = doc["spec"].get("backend", {})
        if doc["kind"] == "RateLimitPolicy" and backend.get("type") == "GLOBAL":
            backend["storage"] = redis_url
    return docs


def build(name: str) -> Starlette:
    async def order(request: Request) -> JSONResponse:
        return JSONResponse({"replica": name, "order": request.path_params["order_id"]})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"replica": name})

    return Starlette(routes=[Route("/orders/{order_id}", order), Route("/health", health)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one replica of the orders service")
    parser.add_argument("--name", default="a")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="default %(default)s")
    args = parser.parse_args()
    mesh = meshlib.Mesh.from_resources(policy(args.redis), workload="orders")
    meshlib.serve(meshlib.MeshMiddleware(build(args.name), mesh=mesh), mesh=mesh, port=args.port, log_level="warning")
