"""The control plane's dashboard: one static page (``/dashboard``) that polls ``/dashboard/state``.

The page itself holds no data and no secret, so it is served to anyone; its state
(the service graph with RED per edge, the data planes, certificates, breakers, the
policy in force and its history) needs a bearer token: the read-only view token
(``ControlPlane(view_token=...)``, ``STATE_DIR/view-token`` for ``meshlib
control-plane``) or an admin token. The page reads the view token from the URL's
fragment (never sent to a server) or from a field, and keeps it in the tab's
sessionStorage. Changes (apply, rollback) go to the admin API itself with an admin
token the user pastes for that one request: the page never stores it, and the
server never puts a token in the page.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

if TYPE_CHECKING:
    from ._server import ControlPlane

__all__ = ["dashboard_routes", "dashboard_state"]

_STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}


def _asset(name: str) -> bytes:
    return resources.files("meshlib.control").joinpath("dashboard", name).read_bytes()


def dashboard_routes(plane: ControlPlane) -> list[BaseRoute]:
    """``/dashboard`` (the page), its two static files, and ``/dashboard/state`` (JSON, view or admin token)."""
    history_cache: dict[str, Any] = {"version": -1, "history": []}

    async def page(request: Request) -> Response:
        return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers=_HEADERS)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC:
            return Response("not found", status_code=404)
        return Response(_asset(name), media_type=_STATIC[name], headers=_HEADERS)

    async def state(request: Request) -> Response:
        if not plane.may_view(request):
            return JSONResponse(
                {"error": "send Authorization: Bearer <the view token or an admin token>"},
                status_code=401,
                headers={"cache-control": "no-store"},
            )
        if history_cache["version"] != plane.version:  # the history changes only with the version
            history_cache["history"] = await plane.history()
            history_cache["version"] = plane.version
        return JSONResponse(dashboard_state(plane, history_cache["history"]), headers={"cache-control": "no-store"})

    return [
        Route("/dashboard", page, methods=["GET"]),
        Route("/dashboard/state", state, methods=["GET"]),
        Route("/dashboard/static/{name}", static, methods=["GET"]),
    ]


def _short(host: str) -> str:
    """``reviews`` for ``reviews.default.svc.cluster.local``: the graph's node, named like the workload behind it."""
    name, _, rest = host.partition(".")
    return name if rest.endswith("svc.cluster.local") else host


def dashboard_state(plane: ControlPlane, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the page shows, in one document."""
    reports = plane.reports
    edges = reports.edges()
    dataplanes = []
    breakers: list[dict[str, Any]] = []
    ejected: list[dict[str, Any]] = []
    for d in plane.dataplanes():
        node = str(d["node"])
        latest = reports.latest(node) or {}
        age = reports.age(node)
        dataplanes.append(
            {
                key: d.get(key)
                for key in (
                    "node",
                    "workload",
                    "namespace",
                    "service_account",
                    "labels",
                    "replica",
                    "connected",
                    "state",
                    "sent_version",
                    "acked_version",
                    "acked_snapshot",
                    "acked_at",
                    "last_nack",
                )
            }
            | {"certificate": latest.get("certificate"), "report_age": age}
        )
        if d.get("connected"):
            for item in latest.get("breakers") or ():
                breakers.append({"node": node, "workload": d.get("workload"), **item})
            for item in latest.get("ejected") or ():
                ejected.append({"node": node, "workload": d.get("workload"), **item})
    for e in edges:
        e["service"] = _short(str(e["destination"]))
    # The server side may name a service differently (short or FQDN): count an edge once, from its source.
    from_source = {(e["source"], e["source_namespace"], e["service"]) for e in edges if e["reporter"] == "source"}
    edges = [
        e
        for e in edges
        if e["reporter"] == "source" or (e["source"], e["source_namespace"], e["service"]) not in from_source
    ]
    services = {str(d["workload"]) for d in dataplanes if d["connected"]}
    for e in edges:
        services.add(e["service"])
        if e["source"] != "unknown":
            services.add(str(e["source"]))
    return {
        "now": time.time(),
        "version": plane.version,
        "replica": plane.replica,
        "services": sorted(services),
        "edges": edges,
        "dataplanes": dataplanes,
        "breakers": breakers,
        "ejected": ejected,
        "resources": [
            {
                "kind": doc.get("kind"),
                "namespace": (doc.get("metadata") or {}).get("namespace"),
                "name": (doc.get("metadata") or {}).get("name"),
                "document": doc,
            }
            for doc in plane.config.documents
        ],
        "history": history,
    }
