"""The sidecar's admin port: readiness, metrics, the configuration in force, and the endpoints as the engines see them.

Read-only and meant for loopback (Envoy's admin port is 15000 on 127.0.0.1 too). Nothing
secret is served: resources carry no keys, and the certificate appears as its identity,
serial and expiry only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..mesh import Mesh

__all__ = ["admin_app"]


def _certificate(mesh: Mesh) -> dict[str, Any] | None:
    certificates = mesh.certificates
    if certificates is None:
        return None
    try:
        issued = certificates.issued
    except Exception:  # not issued yet (the CA is unreachable): say so rather than fail the page
        return {"identity": str(certificates.identity), "issued": False}
    return {
        "identity": str(issued.identity),
        "serial": f"{issued.serial:x}",
        "not_before": issued.not_before,
        "not_after": issued.not_after,
        "expires_in": round(issued.not_after - time.time(), 1),
    }


def config_dump(mesh: Mesh) -> dict[str, Any]:
    agent = mesh.agent
    return {
        "workload": str(mesh.workload.spiffe_id) if mesh.workload is not None else None,
        "snapshot": mesh.version,
        "control_plane": None
        if agent is None
        else {"url": agent.url, "version": agent.version, "stale": agent.stale, "last_nack": agent.last_nack},
        "certificate": _certificate(mesh),
        "resources": [r.to_document() for r in mesh.snapshot.resources],
    }


def clusters(mesh: Mesh, now: Callable[[], float] = time.monotonic) -> list[dict[str, Any]]:
    """Every destination the engines have met: its endpoints, which are ejected and until when, the breaker."""
    out = []
    moment = now()
    for dest in list(mesh.outbound.destinations.values()):
        ejected = dest.outlier.ejected(moment)
        endpoints = []
        for key, endpoint in zip(dest.balancer.keys, dest.endpoints, strict=True):
            address, port = dest.targets[key]
            until = dest.outlier.ejected_until(key)
            endpoints.append(
                {
                    "address": f"{address}:{port}",
                    "labels": dict(endpoint.labels),
                    "healthy": key not in ejected,
                    "ejected_for": round(until - moment, 3) if until is not None and key in ejected else None,
                    "tls": dest.tls.get(key) is not None,
                }
            )
        out.append(
            {
                "host": dest.host,
                "subset": dest.subset,
                "port": dest.port,
                "breaker": dest.breaker.state,
                "retries": dest.counters.retries,
                "ejections": dest.counters.ejections,
                "endpoints": endpoints,
            }
        )
    return sorted(out, key=lambda c: (c["host"], c["subset"] or "", c["port"] or 0))


class _Asgi:
    """A plain ASGI app as a Starlette route (a function would be taken for a request handler)."""

    def __init__(self, app: Any) -> None:
        self.app: ASGIApp = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def admin_app(mesh: Mesh, ready: Callable[[], bool]) -> Starlette:
    async def ready_page(request: Request) -> Response:
        if ready():
            return JSONResponse({"status": "ready", "snapshot": mesh.version})
        return JSONResponse({"status": "not ready"}, status_code=503)

    async def config_page(request: Request) -> Response:
        return JSONResponse(config_dump(mesh))

    async def clusters_page(request: Request) -> Response:
        return JSONResponse({"clusters": clusters(mesh)})

    return Starlette(
        routes=[
            Route("/ready", ready_page, methods=["GET"]),
            Route("/config", config_page, methods=["GET"]),
            Route("/clusters", clusters_page, methods=["GET"]),
            Route("/metrics", _Asgi(mesh.metrics_app()), methods=["GET", "HEAD"]),
        ]
    )
