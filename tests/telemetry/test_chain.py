"""A call chain order → payment → ledger: three real services on loopback, each with its own Mesh.

Each service is a uvicorn server running its app in ``MeshMiddleware`` and calling
the next one through ``mesh.async_client()``; their tracer providers (one per
service, so each span names its service) share one ``InMemorySpanExporter``, so
the whole chain is visible at once. One request into order must be ONE trace:

    order SERVER → order CLIENT → attempt → payment SERVER → payment CLIENT → attempt → ledger SERVER

Then a scripted mix (2xx, a 5xx from ledger, a retry, an AuthorizationPolicy
denial at payment, a 429 from ledger's RateLimitPolicy) must show in each mesh's
``/metrics`` (parsed by prometheus_client's own parser) and in each service's
JSON access log.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from _upstreams import free_port, serving
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

import meshlib

NAMES = ("order", "payment", "ledger")
NEXT = {"order": "payment", "payment": "ledger"}


def fqdn(name: str) -> str:
    return f"{name}.default.svc.cluster.local"


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with meshlib.set_testing(True):
        yield


def resources(ports: dict[str, int], log: Path) -> list[dict[str, Any]]:
    """The mesh's configuration as each service reads it; only the access-log path differs."""
    docs: list[dict[str, Any]] = []
    for name in NAMES:
        docs.append(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "ServiceEntry",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {
                    "hosts": [name],
                    "location": "MESH_INTERNAL",
                    "resolution": "STATIC",
                    "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                    "endpoints": [{"address": "127.0.0.1", "ports": {"http": ports[name]}, "labels": {"app": name}}],
                },
            }
        )
    docs += [
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "payment", "namespace": "default"},
            "spec": {
                "hosts": ["payment"],
                "http": [{"route": [{"destination": {"host": "payment"}}], "retries": {"attempts": 0}}],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "ledger", "namespace": "default"},
            "spec": {
                "hosts": ["ledger"],
                "http": [
                    {
                        "name": "writes",
                        "route": [{"destination": {"host": "ledger"}}],
                        "retries": {"attempts": 2, "retryOn": "gateway-error"},
                    }
                ],
            },
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "no-refunds", "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": "payment"}},
                "action": "DENY",
                "rules": [{"to": [{"operation": {"paths": ["/refund*"]}}]}],
            },
        },
        {
            "apiVersion": "meshlib.io/v1alpha1",
            "kind": "RateLimitPolicy",
            "metadata": {"name": "ledger-limits", "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": "ledger"}},
                "limits": [{"name": "audits", "rate": "1/minute", "match": {"paths": [{"prefix": "/audit"}]}}],
            },
        },
        {
            "apiVersion": "meshlib.io/v1alpha1",
            "kind": "MeshConfig",
            "metadata": {"name": "mesh", "namespace": "istio-system"},
            "spec": {"accessLog": {"path": str(log)}, "tracing": {"sampling": 100}},
        },
    ]
    return docs


@dataclass
class Service:
    name: str
    mesh: meshlib.Mesh
    log: Path
    hits: Counter[str] = field(default_factory=Counter)

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """order and payment call the next service with the same path; ledger answers by path."""
        assert scope["type"] == "http"
        path = scope["path"]
        self.hits[path] += 1
        if self.name in NEXT:
            async with self.mesh.async_client() as client:
                upstream = await client.get(f"http://{NEXT[self.name]}{path}")
            status, body = upstream.status_code, upstream.content
        elif path.startswith("/fail"):
            status, body = 500, b"ledger broke"
        elif path.startswith("/flaky") and self.hits[path] == 1:
            status, body = 503, b"ledger busy"
        else:
            status, body = 200, b"written"
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-length", str(len(body)).encode())]}
        )
        await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def chain(tmp_path: Path) -> Iterator[tuple[dict[str, Service], InMemorySpanExporter, int]]:
    exporter = InMemorySpanExporter()
    ports = {name: free_port() for name in NAMES}
    services: dict[str, Service] = {}
    for name in NAMES:
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        log = tmp_path / f"{name}.log"
        mesh = meshlib.Mesh.from_resources(
            resources(ports, log),
            workload=meshlib.Workload(name, labels={"app": name}),
            tracer_provider=provider,
        )
        services[name] = Service(name, mesh, log)
    with contextlib.ExitStack() as stack:
        for name in NAMES:
            wrapped = meshlib.MeshMiddleware(services[name].app, mesh=services[name].mesh)
            stack.enter_context(serving(wrapped, port=ports[name]))
        try:
            yield services, exporter, ports["order"]
        finally:
            for service in services.values():
                service.mesh.close()


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """The server span of a hop ends just after its response is sent: wait for the stragglers."""
    limit = time.monotonic() + timeout
    while not check():
        if time.monotonic() > limit:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def service_of(span: ReadableSpan) -> str:
    return str(span.resource.attributes["service.name"])


async def test_one_request_is_one_trace_across_three_services(tmp_path: Path) -> None:
    with chain(tmp_path) as (_services, exporter, port):
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/pay/1")
        assert response.status_code == 200
        wait_for(lambda: len(exporter.get_finished_spans()) == 7)
        spans = list(exporter.get_finished_spans())

    assert len({s.context.trace_id for s in spans}) == 1, "one trace across the chain"
    by_id = {s.context.span_id: s for s in spans}
    (root,) = [s for s in spans if s.parent is None]

    def child_of(parent: ReadableSpan) -> ReadableSpan:
        (child,) = [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]
        return child

    path = [root]
    while len(path) < 7:
        path.append(child_of(path[-1]))
    assert [(service_of(s), s.kind) for s in path] == [
        ("order", SpanKind.SERVER),
        ("order", SpanKind.CLIENT),
        ("order", SpanKind.CLIENT),
        ("payment", SpanKind.SERVER),
        ("payment", SpanKind.CLIENT),
        ("payment", SpanKind.CLIENT),
        ("ledger", SpanKind.SERVER),
    ]
    order_call, order_try, payment_server = path[1], path[2], path[3]
    assert order_call.name == f"GET {fqdn('payment')}"
    assert order_try.attributes is not None
    assert order_try.attributes["meshlib.retry.number"] == 1
    assert payment_server.parent is not None
    assert payment_server.parent.is_remote
    assert path[4].attributes is not None
    assert path[4].attributes["meshlib.route"] == "writes"
    assert all(by_id[s.parent.span_id] is p for p, s in itertools.pairwise(path) if s.parent)


async def scrape(mesh: meshlib.Mesh) -> dict[tuple[str, str, str, str], float]:
    """``meshlib_requests_total`` by (reporter, destination_service, response_code, response_flags), from /metrics."""
    transport = httpx.ASGITransport(app=mesh.metrics_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        text = (await client.get("/metrics")).text
    out: dict[tuple[str, str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "meshlib_requests":
            continue
        for sample in family.samples:
            if sample.name != "meshlib_requests_total":
                continue
            labels = sample.labels
            key = (labels["reporter"], labels["destination_service"], labels["response_code"], labels["response_flags"])
            out[key] = out.get(key, 0.0) + sample.value
    return out


def log_lines(service: Service) -> list[dict[str, Any]]:
    return [json.loads(line) for line in service.log.read_text().splitlines()]


async def test_a_scripted_mix_shows_in_metrics_and_access_logs(tmp_path: Path) -> None:
    script = [
        ("/pay/1", 200),  # all the way down and back
        ("/fail/1", 500),  # ledger answers 500: not a gateway error, not retried
        ("/flaky/1", 200),  # ledger answers 503 once: payment retries
        ("/refund/1", 403),  # payment's AuthorizationPolicy denies: ledger never sees it
        ("/audit/1", 200),  # ledger's limit: one a minute
        ("/audit/2", 429),
    ]
    with chain(tmp_path) as (services, exporter, port):
        async with httpx.AsyncClient() as client:
            for path, status in script:
                response = await client.get(f"http://127.0.0.1:{port}{path}", headers={"x-request-id": path})
                assert response.status_code == status, path
        order, payment, ledger = (services[n] for n in NAMES)

        def logged() -> bool:
            return all(
                service.log.exists() and len(log_lines(service)) >= n
                for service, n in ((order, 12), (payment, 11), (ledger, 6))
            )

        wait_for(logged)
        metrics = {name: await scrape(services[name].mesh) for name in NAMES}

    # order: the test's requests arrive (destination), and go on to payment (source).
    o = metrics["order"]
    assert o[("destination", fqdn("order"), "200", "-")] == 3
    assert o[("destination", fqdn("order"), "500", "-")] == 1
    assert o[("destination", fqdn("order"), "403", "-")] == 1
    assert o[("destination", fqdn("order"), "429", "-")] == 1
    assert o[("source", fqdn("payment"), "200", "-")] == 3
    assert o[("source", fqdn("payment"), "403", "-")] == 1
    # payment: the denial is its own; five calls reach ledger, one of them twice.
    p = metrics["payment"]
    assert p[("destination", fqdn("payment"), "403", "-")] == 1
    assert p[("destination", fqdn("payment"), "200", "-")] == 3
    assert p[("source", fqdn("ledger"), "200", "-")] == 3
    assert p[("source", fqdn("ledger"), "500", "-")] == 1
    assert p[("source", fqdn("ledger"), "429", "-")] == 1
    assert sum(v for k, v in p.items() if k[0] == "source") == 5
    # ledger: every attempt is a request there, the refused one flagged RL.
    led = metrics["ledger"]
    assert led[("destination", fqdn("ledger"), "503", "-")] == 1
    assert led[("destination", fqdn("ledger"), "200", "-")] == 3
    assert led[("destination", fqdn("ledger"), "500", "-")] == 1
    assert led[("destination", fqdn("ledger"), "429", "RL")] == 1
    assert not any(k[0] == "source" for k in led)

    # Access logs: one JSON line per request at each end, matching what happened.
    lines = {name: log_lines(services[name]) for name in NAMES}
    assert Counter(line["reporter"] for line in lines["order"]) == {"destination": 6, "source": 6}
    assert Counter(line["reporter"] for line in lines["payment"]) == {"destination": 6, "source": 5}
    assert Counter(line["reporter"] for line in lines["ledger"]) == {"destination": 6}
    (denied,) = [x for x in lines["payment"] if x["reporter"] == "destination" and x["response_code"] == 403]
    assert denied["authz_policy"] == "AuthorizationPolicy/default/no-refunds"
    assert denied["path"] == "/refund/1"
    (limited,) = [x for x in lines["ledger"] if x["response_code"] == 429]
    assert limited["response_flags"] == "RL"
    (retried,) = [x for x in lines["payment"] if x["reporter"] == "source" and x["path"] == "/flaky/1"]
    assert (retried["attempts"], retried["response_code"]) == (2, 200)
    # The same request carries the same trace id at every hop.
    paid = [x for name in NAMES for x in lines[name] if x["path"] == "/pay/1"]
    assert len(paid) == 5
    assert len({x["trace_id"] for x in paid}) == 1
    assert {x["trace_id"] for x in paid} <= {format(s.context.trace_id, "032x") for s in exporter.get_finished_spans()}
