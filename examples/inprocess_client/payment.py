"""The payment service: a plain Starlette app that knows nothing of the mesh.

``order.py`` runs three instances of it: two of the stable version ``v1`` (one of them
flaky: every second request it answers 503) and one canary ``v2``. Each instance
counts what it answered, so ``order.py`` can show what the mesh did on the wire.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def payment_app(name: str, version: str, *, fail_every: int = 0, statement_seconds: float = 1.0) -> Starlette:
    """One instance: ``POST /charge`` (503 on every ``fail_every``-th request) and a slow ``GET /statement``."""
    answered: Counter[int] = Counter()
    requests = 0

    async def charge(request: Request) -> JSONResponse:
        nonlocal requests
        requests += 1
        key = request.headers.get("idempotency-key")
        status = 503 if fail_every and requests % fail_every == 0 else 200
        answered[status] += 1
        return JSONResponse({"instance": name, "version": version, "charge": key}, status_code=status)

    async def statement(request: Request) -> JSONResponse:
        await asyncio.sleep(statement_seconds)
        answered[200] += 1
        return JSONResponse({"instance": name, "version": version, "statement": []})

    app = Starlette(routes=[Route("/charge", charge, methods=["POST"]), Route("/statement", statement)])
    app.state.answered = answered
    return app
