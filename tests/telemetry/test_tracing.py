"""Traces: one CLIENT span per logical request, one child per attempt, a SERVER span in the middleware.

Spans are read from an ``InMemorySpanExporter``: either on a provider the test
passes (``tracer_provider=``) or added to meshlib's own provider, which is the one
MeshConfig's sampling configures. Upstreams are real loopback servers that record
the headers they received, so propagation is checked on the wire.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from _upstreams import Upstream, service_entry, serving, to, upstreams, virtual_service
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags

import meshlib
from meshlib.policy._meshkinds import TracingSettings
from meshlib.telemetry import RequestRecord, Tracing

REVIEWS = "reviews.default.svc.cluster.local"
RETRY_5XX = {"route": [to("reviews")], "retries": {"attempts": 2, "retryOn": "5xx"}}


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with meshlib.set_testing(True):
        yield


def mesh_config(**tracing: Any) -> dict[str, Any]:
    return {
        "apiVersion": "meshlib.io/v1alpha1",
        "kind": "MeshConfig",
        "metadata": {"name": "mesh", "namespace": "istio-system"},
        "spec": {"tracing": tracing, "accessLog": {"enabled": False}},
    }


def traced_mesh(*docs: dict[str, Any], workload: str = "productpage") -> tuple[meshlib.Mesh, InMemorySpanExporter]:
    """A mesh whose spans all go to an in-memory exporter (a provider that samples everything)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return meshlib.Mesh.from_resources(list(docs), workload=workload, tracer_provider=provider), exporter


def recorded(mesh: meshlib.Mesh) -> list[RequestRecord]:
    """Keep every record the mesh reports (and still report it)."""
    records: list[RequestRecord] = []
    report = mesh.telemetry.record

    def keep(record: RequestRecord) -> None:
        records.append(record)
        report(record)

    mesh.telemetry.record = keep  # type: ignore[method-assign]
    return records


def by_kind(spans: tuple[ReadableSpan, ...] | list[ReadableSpan]) -> tuple[list[ReadableSpan], list[ReadableSpan]]:
    """(logical spans, attempt spans): an attempt's parent is another span of the same trace in the list."""
    ids = {s.context.span_id for s in spans}
    attempts = [s for s in spans if s.parent is not None and s.parent.span_id in ids]
    return [s for s in spans if s not in attempts], attempts


def traceparent_span_id(value: str) -> int:
    return int(value.split("-")[2], 16)


def sampled(traceparent: str) -> bool:
    """The sampled bit of a ``traceparent`` (the SDK also sets the W3C level 2 random bit, 0x02)."""
    return bool(int(traceparent.rsplit("-", 1)[1], 16) & 1)


# ---------------------------------------------------------------------------- client spans


async def test_a_retried_request_is_one_logical_span_with_an_attempt_child_per_try() -> None:
    with upstreams(Upstream("up", mode="flaky", every=2)) as (up,):
        mesh, exporter = traced_mesh(service_entry("reviews", up), virtual_service("reviews", RETRY_5XX))
        records = recorded(mesh)
        async with mesh.async_client() as client:
            assert (await client.get("http://reviews/")).status_code == 200  # hit 1: fine
            exporter.clear()
            records.clear()
            response = await client.get("http://reviews/ratings?x=1", headers={"x-request-id": "req-7"})
        assert response.status_code == 200  # hit 2 failed with 503, hit 3 answered

    spans = exporter.get_finished_spans()
    (logical,), attempts = by_kind(spans)
    assert logical.name == f"GET {REVIEWS}"
    assert logical.kind is SpanKind.CLIENT
    assert logical.attributes is not None
    assert logical.attributes["meshlib.attempts"] == 2
    assert logical.attributes["http.response.status_code"] == 200
    assert logical.attributes["http.request.method"] == "GET"
    assert logical.attributes["url.full"] == "http://reviews/ratings?x=1"
    assert logical.attributes["meshlib.route"] == "http[0]"
    assert logical.attributes["meshlib.virtual_service"] == "VirtualService/default/reviews"
    assert logical.status.status_code is StatusCode.UNSET

    attempts.sort(key=lambda s: s.attributes["meshlib.retry.number"] if s.attributes else 0)
    assert [a.attributes and a.attributes["meshlib.retry.number"] for a in attempts] == [1, 2]
    for attempt in attempts:
        assert attempt.parent is not None
        assert attempt.parent.span_id == logical.context.span_id
        assert attempt.context.trace_id == logical.context.trace_id
        assert attempt.kind is SpanKind.CLIENT
        assert attempt.name == f"GET {up.address}"
        assert attempt.attributes is not None
        assert attempt.attributes["server.address"] == "127.0.0.1"
        assert attempt.attributes["server.port"] == up.port
    first, second = attempts
    assert first.attributes is not None
    assert first.attributes["http.response.status_code"] == 503
    assert first.status.status_code is StatusCode.ERROR
    assert second.attributes is not None
    assert second.attributes["http.request.resend_count"] == 1

    # Each try carried its own span as the parent the upstream sees.
    sent = [traceparent_span_id(r["headers"]["traceparent"]) for r in up.requests[-2:]]
    assert sent == [first.context.span_id, second.context.span_id]
    assert all(sampled(r["headers"]["traceparent"]) for r in up.requests[-2:])

    (record,) = records
    assert record.reporter == "source"
    assert (record.source_workload, record.source_namespace) == ("productpage", "default")
    assert record.destination_service == REVIEWS
    assert record.response_code == 200
    assert record.attempts == 2
    assert record.upstream_host == up.address
    assert record.response_flags == "-"
    assert record.connection_security_policy == "none"
    assert record.trace_id == format(logical.context.trace_id, "032x")
    assert record.request_id == "req-7"
    assert record.path == "/ratings?x=1"
    assert record.duration > 0


async def test_retries_running_out_flag_the_last_response_urx() -> None:
    with upstreams(Upstream("up", mode="fail", status=503)) as (up,):
        mesh, exporter = traced_mesh(service_entry("reviews", up), virtual_service("reviews", RETRY_5XX))
        records = recorded(mesh)
        async with mesh.async_client() as client:
            assert (await client.get("http://reviews/")).status_code == 503

    (logical,), attempts = by_kind(exporter.get_finished_spans())
    assert len(attempts) == 3
    assert logical.attributes is not None
    assert logical.attributes["meshlib.response_flags"] == "URX"
    assert logical.status.status_code is StatusCode.ERROR
    assert (records[0].response_code, records[0].response_flags, records[0].attempts) == (503, "URX", 3)


async def test_a_refused_connection_is_an_error_attempt_and_a_flagged_record() -> None:
    from _upstreams import dead_address

    mesh, exporter = traced_mesh(service_entry("reviews", (dead_address(), "v1")))
    records = recorded(mesh)
    async with mesh.async_client() as client:
        with pytest.raises(httpx.TransportError):
            await client.get("http://reviews/")
    (logical,), attempts = by_kind(exporter.get_finished_spans())
    assert attempts
    assert all(a.status.status_code is StatusCode.ERROR for a in attempts)
    assert logical.status.status_code is StatusCode.ERROR
    assert records[0].response_code == 0
    assert records[0].response_flags in {"UF", "URX"}


def test_the_sync_client_makes_the_same_spans() -> None:
    with upstreams(Upstream("up", mode="flaky", every=2)) as (up,):
        mesh, exporter = traced_mesh(service_entry("reviews", up), virtual_service("reviews", RETRY_5XX))
        with mesh.client() as client:
            client.get("http://reviews/")
            exporter.clear()
            assert client.get("http://reviews/").status_code == 200

    (logical,), attempts = by_kind(exporter.get_finished_spans())
    assert logical.name == f"GET {REVIEWS}"
    assert sorted(a.attributes["meshlib.retry.number"] for a in attempts if a.attributes) == [1, 2]
    assert traceparent_span_id(up.requests[-1]["headers"]["traceparent"]) in {a.context.span_id for a in attempts}


async def test_a_host_outside_the_mesh_is_traced_and_reported_as_passthrough() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    mesh, exporter = traced_mesh()
    records = recorded(mesh)
    async with mesh.async_client(transport=httpx.MockTransport(handler)) as client:
        assert (await client.get("http://example.org/x")).status_code == 204
    (logical,), (attempt,) = by_kind(exporter.get_finished_spans())
    assert logical.name == "GET"  # no host in the name: outside hosts are unbounded
    assert traceparent_span_id(seen[0].headers["traceparent"]) == attempt.context.span_id
    assert records[0].destination_service == "PassthroughCluster"
    assert records[0].response_code == 204


async def test_a_fault_abort_is_a_span_without_attempts_and_an_fi_record() -> None:
    abort = {"route": [to("reviews")], "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}}}
    with upstreams(Upstream("up")) as (up,):
        mesh, exporter = traced_mesh(service_entry("reviews", up), virtual_service("reviews", abort))
        records = recorded(mesh)
        async with mesh.async_client() as client:
            assert (await client.get("http://reviews/")).status_code == 418
    (logical,), attempts = by_kind(exporter.get_finished_spans())
    assert attempts == []
    assert logical.attributes is not None
    assert logical.attributes["meshlib.response_flags"] == "FI"
    assert (records[0].response_code, records[0].response_flags, records[0].attempts) == (418, "FI", 0)
    assert up.hits == 0


# ---------------------------------------------------------------------------- sampling


def own_exporter(mesh: meshlib.Mesh) -> InMemorySpanExporter:
    """Spans of meshlib's own provider (the one MeshConfig's sampling configures)."""
    exporter = InMemorySpanExporter()
    provider = mesh.telemetry.tracing.provider
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


async def test_sampling_zero_keeps_no_new_trace_but_honours_a_sampled_caller() -> None:
    with upstreams(Upstream("up")) as (up,):
        mesh = meshlib.Mesh.from_resources(
            [service_entry("reviews", up), mesh_config(sampling=0)], workload="productpage"
        )
        exporter = own_exporter(mesh)
        async with mesh.async_client() as client:
            for _ in range(20):
                await client.get("http://reviews/")
            assert exporter.get_finished_spans() == ()
            # Not sampled, still propagated: the next hop joins the same (unsampled) trace.
            assert not sampled(up.requests[-1]["headers"]["traceparent"])

            caller = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
            token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(caller)))
            try:
                await client.get("http://reviews/")
            finally:
                otel_context.detach(token)
        spans = exporter.get_finished_spans()
        assert len(spans) == 2
        assert {s.context.trace_id for s in spans} == {0xABC}
        (logical,), _ = by_kind(spans)
        assert logical.parent is not None
        assert logical.parent.span_id == 0xDEF
        assert up.requests[-1]["headers"]["traceparent"].startswith(f"00-{0xABC:032x}-")
        resource = spans[0].resource.attributes
        assert resource["service.name"] == "productpage"


async def test_sampling_follows_the_mesh_config_in_force() -> None:
    with upstreams(Upstream("up")) as (up,):
        docs = [service_entry("reviews", up)]
        mesh = meshlib.Mesh.from_resources([*docs, mesh_config(sampling=0)], workload="productpage")
        exporter = own_exporter(mesh)
        async with mesh.async_client() as client:
            await client.get("http://reviews/")
            assert len(exporter.get_finished_spans()) == 0
            mesh.update([*docs, mesh_config(sampling=100, propagators=["b3"])])
            await client.get("http://reviews/")
            assert len(exporter.get_finished_spans()) == 2
            assert "x-b3-traceid" in up.requests[-1]["headers"]


def test_unsampled_spans_cost_no_attributes() -> None:
    """Not sampled: the span does not record, so nothing is computed for it."""
    tracing = Tracing(TracingSettings(sampling=0), service_name="x")
    span = tracing.tracer.start_span("GET reviews")
    assert not span.is_recording()
    assert span.get_span_context().is_valid  # still a context to propagate


# ---------------------------------------------------------------------------- propagators


async def test_b3_headers_when_asked_and_traceparent_with_both() -> None:
    with upstreams(Upstream("up")) as (up,):
        docs = [service_entry("reviews", up)]
        b3 = meshlib.Mesh.from_resources([*docs, mesh_config(sampling=100, propagators=["b3"])], workload="p")
        both = meshlib.Mesh.from_resources(
            [*docs, mesh_config(sampling=100, propagators=["tracecontext", "b3"])], workload="p"
        )
        async with b3.async_client() as client:
            await client.get("http://reviews/")
        headers = up.requests[-1]["headers"]
        assert "traceparent" not in headers
        assert len(headers["x-b3-traceid"]) == 32
        assert len(headers["x-b3-spanid"]) == 16
        assert headers["x-b3-sampled"] == "1"
        async with both.async_client() as client:
            await client.get("http://reviews/")
        headers = up.requests[-1]["headers"]
        assert headers["traceparent"].split("-")[1] == headers["x-b3-traceid"]
        assert headers["traceparent"].split("-")[2] == headers["x-b3-spanid"]


# ---------------------------------------------------------------------------- server spans


async def test_the_middleware_continues_the_callers_trace_in_a_server_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    mesh = meshlib.Mesh.from_resources([mesh_config(propagators=["b3"])], workload="ratings", tracer_provider=provider)
    records = recorded(mesh)
    seen: list[trace.Span] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(trace.get_current_span())
        await send({"type": "http.response.start", "status": 201, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    wrapped = meshlib.MeshMiddleware(app, mesh=mesh)
    transport = httpx.ASGITransport(app=wrapped)
    b3 = {"x-b3-traceid": f"{0x1234:032x}", "x-b3-spanid": f"{0x99:016x}", "x-b3-sampled": "1"}
    async with httpx.AsyncClient(transport=transport, base_url="http://ratings") as client:
        assert (await client.post("/rate?stars=5", headers=b3, content=b"abc")).status_code == 201

    (span,) = exporter.get_finished_spans()
    assert span.kind is SpanKind.SERVER
    assert span.name == "POST"
    assert span.context.trace_id == 0x1234
    assert span.parent is not None
    assert span.parent.span_id == 0x99
    assert span.attributes is not None
    assert span.attributes["url.path"] == "/rate"
    assert span.attributes["http.response.status_code"] == 201
    assert span.attributes["meshlib.workload"] == "ratings"
    assert seen[0].get_span_context().span_id == span.context.span_id  # current while the app ran
    (record,) = records
    assert record.reporter == "destination"
    assert (record.destination_workload, record.response_code, record.bytes_sent) == ("ratings", 201, 2)
    assert record.path == "/rate?stars=5"
    assert record.trace_id == f"{0x1234:032x}"
    assert record.bytes_received == 3


async def test_a_denied_request_is_a_server_span_naming_the_policy() -> None:
    deny = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-admin", "namespace": "default"},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]},
    }
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    mesh = meshlib.Mesh.from_resources([deny], workload="ratings", tracer_provider=provider)
    records = recorded(mesh)

    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - never reached
        raise AssertionError("denied requests never reach the app")

    transport = httpx.ASGITransport(app=meshlib.MeshMiddleware(app, mesh=mesh))
    async with httpx.AsyncClient(transport=transport, base_url="http://ratings") as client:
        assert (await client.get("/admin")).status_code == 403
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["meshlib.authz.policy"] == "AuthorizationPolicy/default/no-admin"
    assert span.attributes["meshlib.authz.allowed"] is False
    assert span.status.status_code is StatusCode.UNSET  # a 4xx is not the server's error
    assert (records[0].response_code, records[0].authz_policy) == (403, "AuthorizationPolicy/default/no-admin")


# ---------------------------------------------------------------------------- the OTLP exporter


async def test_spans_are_exported_over_otlp_http_when_an_endpoint_is_set() -> None:
    received: list[tuple[str, str, bytes]] = []
    lock = threading.Lock()

    async def collector(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = dict(scope["headers"])
        with lock:
            received.append((scope["path"], headers.get(b"content-type", b"").decode(), body))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    with serving(collector) as port, upstreams(Upstream("up")) as (up,):
        endpoint = f"http://127.0.0.1:{port}"
        mesh = meshlib.Mesh.from_resources(
            [service_entry("reviews", up), mesh_config(sampling=100, otlpEndpoint=endpoint)], workload="productpage"
        )
        async with mesh.async_client() as client:
            await client.get("http://reviews/")
        await asyncio.to_thread(mesh.close)  # flushes the batch

    assert received, "no OTLP export arrived"
    path, content_type, body = received[0]
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    export = ExportTraceServiceRequest.FromString(body)
    names = {span.name for rs in export.resource_spans for ss in rs.scope_spans for span in ss.spans}
    assert names == {f"GET {REVIEWS}", f"GET {up.address}"}
    service = {
        a.value.string_value for rs in export.resource_spans for a in rs.resource.attributes if a.key == "service.name"
    }
    assert service == {"productpage"}
