"""Server-side RateLimitPolicy in ``MeshMiddleware``: local counters, and global ones in a real Redis.

Requests go through ``httpx.ASGITransport`` (the middleware is the only layer under
test); the global limits count in a ``redis-server`` each test starts on a free
loopback port, stopped and started again to show ``failureMode`` at work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _redis import RedisServer

import meshlib
from meshlib.server import MeshMiddleware

HTTPBIN = meshlib.Workload("httpbin", namespace="foo", labels={"app": "httpbin"})
SIDECAR = "127.0.0.1"
PRODUCTPAGE = "cluster.local/ns/default/sa/productpage"
RATINGS = "cluster.local/ns/default/sa/ratings"

Doc = dict[str, Any]


def rate_limit(*limits: Doc, name: str = "httpbin-limits", backend: Doc | None = None, **spec: Any) -> Doc:
    body: Doc = {"selector": {"matchLabels": {"app": "httpbin"}}, "limits": list(limits), **spec}
    if backend is not None:
        body["backend"] = backend
    return {
        "apiVersion": "meshlib.io/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": name, "namespace": "foo"},
        "spec": body,
    }


def deny_admin() -> Doc:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-admin", "namespace": "foo"},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]},
    }


def xfcc(principal: str) -> str:
    return f"By=spiffe://cluster.local/ns/foo/sa/httpbin;Hash=abc;URI=spiffe://{principal}"


async def ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def middleware(*docs: Doc) -> MeshMiddleware:
    return MeshMiddleware(
        ok, mesh=meshlib.Mesh.from_resources(list(docs), workload=HTTPBIN), trusted_sidecars=[SIDECAR]
    )


async def get(
    app: MeshMiddleware, path: str = "/", *, principal: str | None = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    sent = dict(headers or {})
    if principal is not None:
        sent["x-forwarded-client-cert"] = xfcc(principal)
    transport = httpx.ASGITransport(app=app, client=(SIDECAR, 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://httpbin.foo:8000") as http:
        return await http.get(path, headers=sent)


async def statuses(app: MeshMiddleware, n: int, **kw: Any) -> list[int]:
    return [(await get(app, **kw)).status_code for _ in range(n)]


# -- local limits ---------------------------------------------------------------------------------


async def test_the_fourth_request_of_three_per_minute_is_429_with_headers() -> None:
    app = middleware(rate_limit({"name": "all", "rate": "3/minute"}))
    assert await statuses(app, 3) == [200, 200, 200]
    refused = await get(app)
    assert refused.status_code == 429
    retry_after = refused.headers["retry-after"]
    assert retry_after.isdigit()
    assert 1 <= int(retry_after) <= 60
    assert refused.headers["x-ratelimit-limit"] == "3;w=60"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert refused.headers["x-ratelimit-reset"] == retry_after
    assert "x-meshlib-ratelimit" not in refused.headers  # the storage is fine: this is the limit itself


async def test_authorization_comes_before_the_limit() -> None:
    # A denied request is answered 403 and uses none of the budget.
    app = middleware(rate_limit({"name": "all", "rate": "3/minute"}), deny_admin())
    assert [(await get(app, "/admin")).status_code for _ in range(5)] == [403] * 5
    assert await statuses(app, 4) == [200, 200, 200, 429]


async def test_key_principal_counts_each_caller_apart() -> None:
    app = middleware(rate_limit({"name": "per-caller", "rate": "3/minute", "key": "PRINCIPAL"}))
    assert await statuses(app, 3, principal=PRODUCTPAGE) == [200, 200, 200]
    assert await statuses(app, 3, principal=RATINGS) == [200, 200, 200]
    assert await statuses(app, 1, principal=PRODUCTPAGE) == [429]
    assert await statuses(app, 1, principal=RATINGS) == [429]
    assert await statuses(app, 3) == [200, 200, 200]  # plaintext callers share one "no principal" counter
    assert await statuses(app, 1) == [429]


async def test_key_header_counts_each_value_apart_and_a_missing_header_is_no_way_around() -> None:
    app = middleware(rate_limit({"name": "per-tenant", "rate": "3/minute", "key": "HEADER", "header": "X-Tenant"}))
    assert await statuses(app, 4, headers={"x-tenant": "acme"}) == [200, 200, 200, 429]
    assert await statuses(app, 3, headers={"X-TENANT": "globex"}) == [200, 200, 200]
    assert await statuses(app, 4) == [200, 200, 200, 429]


async def test_a_limit_with_match_counts_only_what_it_selects() -> None:
    limit = {"name": "writes", "rate": "2/minute", "match": {"methods": ["POST"], "paths": [{"prefix": "/orders"}]}}
    app = middleware(rate_limit(limit))
    transport = httpx.ASGITransport(app=app, client=(SIDECAR, 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://httpbin.foo:8000") as http:
        posts = [(await http.post("/orders/1")).status_code for _ in range(3)]
        others = [(await http.get("/orders/1")).status_code, (await http.post("/carts/1")).status_code]
    assert posts == [200, 200, 429]
    assert others == [200, 200]


async def test_a_policy_for_another_workload_limits_nothing() -> None:
    doc = rate_limit({"name": "all", "rate": "1/minute"})
    doc["spec"]["selector"] = {"matchLabels": {"app": "reviews"}}
    assert await statuses(middleware(doc), 3) == [200, 200, 200]


async def test_an_update_keeps_counters_unless_the_server_limits_change() -> None:
    limits = rate_limit({"name": "all", "rate": "3/minute"})
    mesh = meshlib.Mesh.from_resources([limits], workload=HTTPBIN)
    app = MeshMiddleware(ok, mesh=mesh)
    assert await statuses(app, 3) == [200, 200, 200]
    mesh.update([limits, deny_admin()])  # a new snapshot, the same server limits
    assert await statuses(app, 1) == [429]
    assert (await get(app, "/admin")).status_code == 403  # the new snapshot is in force
    mesh.update([rate_limit({"name": "all", "rate": "5/minute"}), deny_admin()])  # the limit changed
    assert await statuses(app, 6) == [200] * 5 + [429]


# -- global limits in Redis ----------------------------------------------------------------------


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def replicas(redis: RedisServer, failure_mode: str = "OPEN", rate: str = "5/minute") -> list[MeshMiddleware]:
    """Two replicas of httpbin: two Mesh objects and two middlewares, one GLOBAL limit in Redis."""
    backend = {"type": "GLOBAL", "storage": redis.url, "failureMode": failure_mode}
    doc = rate_limit({"name": "shared", "rate": rate}, backend=backend)
    return [middleware(doc), middleware(doc)]


async def test_two_replicas_share_one_global_limit(redis: RedisServer) -> None:
    a, b = replicas(redis)
    seen = [(await get(app)).status_code for app in (a, b, a, b, a)]
    assert seen == [200] * 5
    refused = [await get(a), await get(b)]
    assert [r.status_code for r in refused] == [429, 429]
    assert refused[0].headers["x-ratelimit-limit"] == "5;w=60"
    assert int(refused[1].headers["retry-after"]) >= 1


async def test_redis_down_fails_open_then_the_limit_is_back(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = replicas(redis, "OPEN")
    assert await statuses(a, 5) == [200] * 5
    assert await statuses(b, 1) == [429]
    redis.stop()
    with caplog.at_level(logging.INFO, logger="meshlib.ratelimit"):
        assert await statuses(a, 3) + await statuses(b, 3) == [200] * 6  # uncounted, but served
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2, warnings  # once per replica and outage, not once per request
        assert all("failed" in m and "failureMode OPEN lets through" in m and redis.url in m for m in warnings)
        redis.start()  # the same port, empty: counting starts again
        assert await statuses(a, 5) + await statuses(b, 1) == [200] * 5 + [429]
    back = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("is back" in m for m in back), back


async def test_redis_down_fails_closed_then_the_limit_is_back(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = replicas(redis, "CLOSED", rate="2/minute")
    assert await statuses(a, 1) + await statuses(b, 1) == [200, 200]
    redis.stop()
    with caplog.at_level(logging.INFO, logger="meshlib.ratelimit"):
        refused = [await get(a), await get(b)]
        assert [r.status_code for r in refused] == [429, 429]
        assert refused[0].headers["x-meshlib-ratelimit"] == "storage-unavailable"
        assert refused[0].headers["retry-after"] == "1"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings, "no warning that the storage failed"
        assert all("failureMode CLOSED refuses" in m for m in warnings), warnings
        redis.start()
        assert await statuses(a, 1) + await statuses(b, 2) == [200, 200, 429]
    assert any("is back" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
