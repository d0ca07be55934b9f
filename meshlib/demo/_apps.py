"""The demo shop's in-process services: ``orders`` and the ``payments`` instances.

Both are ordinary Starlette apps. The mesh is around them, not in them: they are
served by ``MeshServer`` behind ``MeshMiddleware`` (mTLS, authorization, rate limits),
and ``orders`` calls the others through ``mesh.async_client()``. What they answer is
what the demo measures, so each answer says who served it (service, version,
instance) and who called (the identity the mTLS handshake proved).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..mesh import Mesh
from ..server import peer_identity

__all__ = ["OrdersApp", "PaymentsApp"]


def _caller(request: Request) -> str | None:
    peer = peer_identity(request.scope)
    return str(peer) if peer is not None else None


class PaymentsApp:
    """One payments instance. ``fail_rate`` (0..1) makes it answer that share of payments with 503.

    Payments are ``PUT /payments/{order}``: keyed by the order, so doing one twice is
    harmless, which is what makes retrying them safe (meshlib retries a POST only
    when the upstream provably never saw it).
    """

    def __init__(self, instance: str, version: str, *, seed: int | None = None) -> None:
        self.instance = instance
        self.version = version
        self.fail_rate = 0.0
        self.served = 0
        self.failed = 0
        self._rng = random.Random(seed)
        self._app = Starlette(
            routes=[
                Route("/payments/{order}", self._pay, methods=["PUT"]),
                Route("/health", self._health, methods=["GET"]),
            ]
        )

    async def _pay(self, request: Request) -> Response:
        self.served += 1
        if self.fail_rate and self._rng.random() < self.fail_rate:
            self.failed += 1
            return PlainTextResponse(f"{self.instance}: failing on purpose (the demo's step 3)", status_code=503)
        return JSONResponse(
            {
                "service": "payments",
                "version": self.version,
                "instance": self.instance,
                "order": request.path_params["order"],
                "caller": _caller(request),
            }
        )

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"instance": self.instance, "caller": _caller(request)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


class OrdersApp:
    """``POST /orders``: charge the order with ``payments``, record it in the ``ledger``, answer both replies.

    Its client is made on first use, inside the loop that serves it (an httpx client
    belongs to one event loop).
    """

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self._client: httpx.AsyncClient | None = None
        self._ids = itertools.count(1)
        self._app = Starlette(
            routes=[
                Route("/orders", self._order, methods=["POST"]),
                Route("/health", self._health, methods=["GET"]),
            ]
        )

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = self.mesh.async_client(timeout=10.0)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def _order(self, request: Request) -> Response:
        order = next(self._ids)
        client = self.client()
        answer: dict[str, Any] = {"order": order, "caller": _caller(request)}
        calls: list[tuple[str, Callable[[], Awaitable[httpx.Response]]]] = [
            ("payment", lambda: client.put(f"http://payments/payments/{order}")),
            ("ledger", lambda: client.post("http://ledger/record", json={"order": order})),
        ]
        for step, call in calls:
            try:
                reply = await call()
            except httpx.HTTPError as exc:
                return JSONResponse({**answer, "error": f"{step}: {type(exc).__name__}: {exc}"}, status_code=502)
            if reply.status_code != 200:
                error = f"{step}: {reply.status_code} {reply.text[:200]}"
                return JSONResponse({**answer, "error": error}, status_code=502)
            answer[step] = reply.json()
        return JSONResponse(answer)

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"service": "orders", "caller": _caller(request)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)
