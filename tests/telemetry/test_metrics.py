"""RED request metrics, the engine collector and the ``/metrics`` endpoint, read back through Prometheus' parser."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from _upstreams import destination_rule, service_entry, to, virtual_service
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import meshlib
from meshlib.engine import Proceed, Refusal, RequestView
from meshlib.engine._outcome import Outcome
from meshlib.telemetry._endpoint import metrics_app
from meshlib.telemetry._metrics import REQUEST_LABELS, EngineCollector, EngineState, RequestMetrics
from meshlib.telemetry._record import RequestRecord

REVIEWS = "reviews.default.svc.cluster.local"
ENDPOINTS = (("127.0.0.1:9001", "v1"), ("127.0.0.1:9002", "v1"), ("127.0.0.1:9003", "v1"))


def samples(registry: CollectorRegistry) -> list[Sample]:
    text = generate_latest(registry).decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (fails if there are none)."""
    found = [s.value for s in samples(registry) if s.name == name and labels.items() <= s.labels.items()]
    assert found, f"no sample {name}{labels}"
    return sum(found)


def record(**fields: Any) -> RequestRecord:
    base: dict[str, Any] = {
        "reporter": "source",
        "source_workload": "productpage",
        "source_namespace": "default",
        "source_principal": "spiffe://cluster.local/ns/default/sa/productpage",
        "destination_service": REVIEWS,
        "destination_workload": "reviews",
        "destination_namespace": "default",
        "destination_subset": "v1",
        "connection_security_policy": "mutual_tls",
        "method": "GET",
        "path": "/reviews/1234?user=alice",
        "authority": "reviews",
        "upstream_host": "10.1.2.3:9080",
        "duration": 0.012,
    }
    return RequestRecord(**{**base, **fields})


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


# ---------------------------------------------------------------------------- request metrics


def test_counts_errors_and_durations_by_istio_labels(registry: CollectorRegistry) -> None:
    metrics = RequestMetrics(registry)
    metrics.observe(record(response_code=200, duration=0.003))
    metrics.observe(record(response_code=200, duration=0.040))
    metrics.observe(record(response_code=503, duration=0.020, response_flags="URX"))
    metrics.observe(record(response_code=0, response_flags="UH", duration=0.0))
    metrics.observe(record(response_code=429, response_flags="RL", reporter="destination"))

    assert value(registry, "meshlib_requests_total") == 5
    assert value(registry, "meshlib_requests_total", response_code="200", reporter="source") == 2
    assert value(registry, "meshlib_requests_total", response_code="0", response_flags="UH") == 1
    assert value(registry, "meshlib_requests_total", reporter="destination", response_flags="RL") == 1
    # Errors: the 5xx and the request that got no response; a 429 is the client's problem, not an error.
    assert value(registry, "meshlib_request_errors_total") == 2
    assert value(registry, "meshlib_request_errors_total", response_code="503") == 1
    assert value(registry, "meshlib_request_errors_total", response_code="0") == 1
    assert value(registry, "meshlib_request_errors_total", response_code="429") == 0

    ok = {"response_code": "200", "reporter": "source"}
    assert value(registry, "meshlib_request_duration_milliseconds_count", **ok) == 2
    assert value(registry, "meshlib_request_duration_milliseconds_sum", **ok) == pytest.approx(43.0)
    assert value(registry, "meshlib_request_duration_milliseconds_bucket", le="5.0", **ok) == 1  # 3 ms
    assert value(registry, "meshlib_request_duration_milliseconds_bucket", le="25.0", **ok) == 1
    assert value(registry, "meshlib_request_duration_milliseconds_bucket", le="50.0", **ok) == 2  # and 40 ms
    assert value(registry, "meshlib_request_duration_milliseconds_bucket", le="+Inf", **ok) == 2
    buckets = {s.labels["le"] for s in samples(registry) if s.name == "meshlib_request_duration_milliseconds_bucket"}
    assert {"0.5", "3.6e+06", "+Inf"} <= buckets  # Istio's buckets, sub-millisecond to an hour


def test_labels_are_istios_and_carry_no_path_or_address(registry: CollectorRegistry) -> None:
    metrics = RequestMetrics(registry)
    metrics.observe(record(response_code=200))
    text = generate_latest(registry).decode()
    for forbidden in ("/reviews/1234", "alice", "10.1.2.3", "9080"):
        assert forbidden not in text
    for sample in samples(registry):
        if sample.name.startswith("meshlib_request"):
            assert set(sample.labels) - {"le"} == set(REQUEST_LABELS)


def test_repeated_label_sets_reuse_their_children(registry: CollectorRegistry) -> None:
    metrics = RequestMetrics(registry)
    for _ in range(100):
        metrics.observe(record(response_code=200))
    assert len(metrics._children) == 1
    assert value(registry, "meshlib_requests_total") == 100


def test_label_sets_beyond_the_cap_fold_into_other_with_one_warning(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = RequestMetrics(registry, max_children=3)
    with caplog.at_level(logging.WARNING, logger="meshlib.telemetry"):
        for i in range(10):
            metrics.observe(record(response_code=200, destination_service=f"svc{i}.default.svc.cluster.local"))
    assert len(metrics._children) == 4  # three real label sets and the folded one
    assert value(registry, "meshlib_requests_total") == 10
    assert value(registry, "meshlib_requests_total", destination_service="other", source_workload="other") == 7
    assert value(registry, "meshlib_requests_total", destination_service="svc0.default.svc.cluster.local") == 1
    assert len([r for r in caplog.records if "label sets" in r.getMessage()]) == 1


# ---------------------------------------------------------------------------- engine collector


def mesh_of(*docs: dict[str, Any], ca: meshlib.CertificateAuthority | None = None) -> meshlib.Mesh:
    return meshlib.Mesh.from_resources(list(docs), workload="productpage", seed=7, ca=ca)


def collector_over(mesh: meshlib.Mesh, registry: CollectorRegistry) -> None:
    def state() -> EngineState:
        return EngineState(mesh.outbound, mesh.inbound, mesh.certificates, mesh.version, "productpage", "default")

    registry.register(EngineCollector(state))


def failing_requests(mesh: meshlib.Mesh, count: int, now: float = 0.0) -> list[str]:
    """Send ``count`` requests whose every attempt answers 503; the refusals' flags, in order."""
    flags = []
    for _ in range(count):
        plan = mesh.outbound.plan(RequestView.from_parts("GET", "http://reviews/", {}), now)
        assert isinstance(plan, Proceed)
        call = plan.call
        while True:
            attempt = call.next_attempt(now)
            if isinstance(attempt, Refusal):
                flags.append(attempt.flag)
                break
            if not call.finish(attempt, Outcome.response(503), now).retry:
                break
        call.close()
    return flags


RESILIENT = (
    service_entry("reviews", *ENDPOINTS),
    destination_rule(
        "reviews",
        ("v1",),
        {"outlierDetection": {"consecutive5xxErrors": 2, "interval": "10s", "baseEjectionTime": "30s"}},
    ),
    virtual_service("reviews", {"route": [to("reviews")], "retries": {"attempts": 2, "retryOn": "5xx"}}),
)


@pytest.fixture
def mesh() -> Iterator[meshlib.Mesh]:
    m = mesh_of(*RESILIENT, ca=meshlib.CertificateAuthority.create())
    yield m
    m.close()


def test_engine_collector_reports_retries_ejections_breaker_and_certificate(
    mesh: meshlib.Mesh, registry: CollectorRegistry
) -> None:
    collector_over(mesh, registry)
    dest = {"destination_service": REVIEWS, "destination_subset": "unknown", "source_workload": "productpage"}
    assert not [s for s in samples(registry) if s.name == "meshlib_retries_total"]  # no destination used yet
    assert failing_requests(mesh, 1) == []
    assert value(registry, "meshlib_circuit_breaker_state", state="closed", **dest) == 1
    assert value(registry, "meshlib_retries_total", **dest) == 2
    assert value(registry, "meshlib_outlier_ejections_total", **dest) == 0  # one 503 on each endpoint so far

    # The 7th consecutive failure (first attempt of the 3rd request) opens the breaker: its retry is refused (UO).
    assert failing_requests(mesh, 4) == ["UO", "UO", "UO"]  # the 2nd request ran its 3 attempts; then refused
    assert value(registry, "meshlib_retries_total", **dest) == 5
    assert value(registry, "meshlib_outlier_ejections_total", **dest) == 1  # maxEjectionPercent 10: one of three
    assert value(registry, "meshlib_outlier_ejected_endpoints", **dest) == 1
    assert value(registry, "meshlib_destination_endpoints", **dest) == 3
    assert value(registry, "meshlib_circuit_breaker_state", state="open", **dest) == 1
    assert value(registry, "meshlib_circuit_breaker_state", state="closed", **dest) == 0
    assert value(registry, "meshlib_circuit_breaker_open_total", **dest) == 1
    assert value(registry, "meshlib_pool_active_requests", **dest) == 0  # every attempt freed its slot
    assert value(registry, "meshlib_config_info", version=mesh.version, workload="productpage") == 1

    certs = mesh.certificates
    assert certs is not None
    identity = "spiffe://cluster.local/ns/default/sa/productpage"
    assert value(registry, "meshlib_certificate_expiry_timestamp_seconds", identity=identity) == certs.issued.not_after
    assert value(registry, "meshlib_certificate_renewals_total", identity=identity) == 0
    certs.renew()
    assert value(registry, "meshlib_certificate_renewals_total", identity=identity) == 1
    assert value(registry, "meshlib_certificate_expiry_timestamp_seconds", identity=identity) == certs.issued.not_after


def test_destination_counters_survive_a_snapshot_swap_even_when_the_policy_changes(
    mesh: meshlib.Mesh, registry: CollectorRegistry
) -> None:
    collector_over(mesh, registry)
    failing_requests(mesh, 2)
    dest = {"destination_service": REVIEWS}
    assert value(registry, "meshlib_retries_total", **dest) == 4
    assert value(registry, "meshlib_outlier_ejections_total", **dest) == 1
    changed = destination_rule("reviews", ("v1",), {"outlierDetection": {"consecutive5xxErrors": 3}})
    old_version = mesh.version
    mesh.update([RESILIENT[0], changed, RESILIENT[2]])
    assert mesh.version != old_version
    assert value(registry, "meshlib_retries_total", **dest) == 4
    assert value(registry, "meshlib_outlier_ejections_total", **dest) == 1
    assert value(registry, "meshlib_outlier_ejected_endpoints", **dest) == 0  # a new detector: its policy changed
    assert value(registry, "meshlib_config_info", version=mesh.version) == 1
    assert not [s for s in samples(registry) if s.name == "meshlib_config_info" and s.labels["version"] == old_version]


def test_engine_collector_counts_rate_limit_refusals_by_policy_and_limit(registry: CollectorRegistry) -> None:
    limit = {
        "apiVersion": "meshlib.io/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": "reviews-calls", "namespace": "default"},
        "spec": {"side": "CLIENT", "host": "reviews", "limits": [{"name": "per-minute", "rate": "1/minute"}]},
    }
    mesh = mesh_of(service_entry("reviews", *ENDPOINTS), limit)
    collector_over(mesh, registry)
    request = RequestView.from_parts("GET", "http://reviews/", {})
    assert isinstance(mesh.outbound.plan(request, 0.0), Proceed)
    for _ in range(2):
        with pytest.raises(meshlib.RateLimitedError):
            mesh.outbound.plan(request, 0.0)
    assert value(registry, "meshlib_rate_limited_total", side="client", limit="per-minute") == 2
    refused = next(s for s in samples(registry) if s.name == "meshlib_rate_limited_total")
    assert "reviews-calls" in refused.labels["policy"]


def test_registering_the_collector_does_not_read_engine_state(registry: CollectorRegistry) -> None:
    def unreadable() -> EngineState:
        raise AssertionError("read at registration")

    registry.register(EngineCollector(unreadable))  # auto_describe: uses describe(), not collect()


# ---------------------------------------------------------------------------- the endpoint


async def test_endpoint_serves_prometheus_text_and_openmetrics_on_request(registry: CollectorRegistry) -> None:
    RequestMetrics(registry).observe(record(response_code=200))
    transport = httpx.ASGITransport(app=metrics_app(registry))
    async with httpx.AsyncClient(transport=transport, base_url="http://mesh") as client:
        r = await client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"] == choose_encoder("")[1]  # the classic text format (0.0.4)
        assert r.headers["content-type"].startswith("text/plain")
        names = {f.name for f in text_string_to_metric_families(r.text)}
        assert {"meshlib_requests", "meshlib_request_errors", "meshlib_request_duration_milliseconds"} <= names

        om = await client.get("/anything", headers={"accept": "application/openmetrics-text; version=1.0.0"})
        assert om.status_code == 200
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert "meshlib_requests" in {f.name for f in parse_openmetrics(om.text)}

        head = await client.head("/metrics")
        assert head.status_code == 200
        assert head.content == b""
        assert int(head.headers["content-length"]) > 0

        post = await client.post("/metrics", content=b"x")
        assert post.status_code == 405
        assert post.headers["allow"] == "GET, HEAD"


async def test_endpoint_mounts_under_starlette(registry: CollectorRegistry) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    RequestMetrics(registry).observe(record(response_code=200))
    app = Starlette(routes=[Mount("/metrics", app=metrics_app(registry))])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mesh") as client:
        r = await client.get("/metrics/")
    assert r.status_code == 200
    assert "meshlib_requests_total" in r.text
