"""``Outbound.plan`` and ``Call``: local replies, retry options from the route, pool and rate-limit decisions."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from _upstreams import dead_address, destination_rule, service_entry, to, virtual_service

import meshlib
from meshlib.engine import Call, LocalReply, Outcome, Proceed, RequestView

WORKLOAD = "productpage"
ENDPOINTS = (("127.0.0.1:9001", "v1"), ("127.0.0.1:9002", "v1"), ("127.0.0.1:9003", "v1"))
HEADER_OPS = {"response": {"set": {"x-route": "reviews"}, "add": {"x-extra": "1"}, "remove": ["content-type"]}}


def mesh_of(*docs: dict[str, Any]) -> meshlib.Mesh:
    return meshlib.Mesh.from_resources(list(docs), workload=WORKLOAD, seed=7)


def plan(mesh: meshlib.Mesh, method: str = "GET", headers: dict[str, str] | None = None) -> Any:
    return mesh.outbound.plan(RequestView.from_parts(method, "http://reviews/", headers or {}), 0.0)


def proceed(mesh: meshlib.Mesh, method: str = "GET", headers: dict[str, str] | None = None) -> Call:
    p = plan(mesh, method, headers)
    assert isinstance(p, Proceed)
    return p.call


# ---------------------------------------------------------------------------- local replies


def test_fault_with_delay_and_abort_both_firing_waits_then_aborts() -> None:
    fault = {
        "delay": {"fixedDelay": "250ms", "percentage": {"value": 100}},
        "abort": {"httpStatus": 503, "percentage": {"value": 100}},
    }
    mesh = mesh_of(
        service_entry("reviews", *ENDPOINTS), virtual_service("reviews", {"fault": fault, "route": [to("reviews")]})
    )
    reply = plan(mesh)
    assert isinstance(reply, LocalReply)
    assert (reply.status, reply.flag, reply.delay) == (503, "FI", 0.25)


def test_abort_without_delay_answers_at_once() -> None:
    fault = {"abort": {"httpStatus": 500, "percentage": {"value": 100}}}
    mesh = mesh_of(
        service_entry("reviews", *ENDPOINTS), virtual_service("reviews", {"fault": fault, "route": [to("reviews")]})
    )
    reply = plan(mesh)
    assert isinstance(reply, LocalReply)
    assert reply.delay is None


@pytest.mark.parametrize(
    "rule",
    [
        {"redirect": {"uri": "/v2/"}},
        {"directResponse": {"status": 418, "body": {"string": "teapot"}}},
        {"fault": {"abort": {"httpStatus": 500, "percentage": {"value": 100}}}, "route": [to("reviews")]},
    ],
    ids=["redirect", "directResponse", "fault-abort"],
)
def test_route_response_header_operations_apply_to_local_replies(rule: dict[str, Any]) -> None:
    mesh = mesh_of(service_entry("reviews", *ENDPOINTS), virtual_service("reviews", {**rule, "headers": HEADER_OPS}))
    reply = plan(mesh)
    assert isinstance(reply, LocalReply)
    names = [name for name, _ in reply.headers]
    assert ("x-route", "reviews") in reply.headers
    assert ("x-extra", "1") in reply.headers
    assert "content-type" not in names  # removed even though the reply has a body
    if "redirect" in rule:
        assert ("location", "http://reviews/v2/") in reply.headers


# ---------------------------------------------------------------------------- retries


def test_retry_ignore_previous_hosts_false_lets_a_retry_go_back_to_the_same_host() -> None:
    lb = {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}}
    tried: dict[bool, list[str]] = {}
    for ignore in (True, False):
        retries = {"attempts": 2, "retryOn": "5xx", "retryIgnorePreviousHosts": ignore}
        mesh = mesh_of(
            service_entry("reviews", *ENDPOINTS),
            destination_rule("reviews", (), lb),
            virtual_service("reviews", {"route": [to("reviews")], "retries": retries}),
        )
        call = proceed(mesh, headers={"x-user": "alice"})
        assert call.retry.avoid_previous_hosts is ignore
        addresses = []
        for _ in range(3):
            attempt = call.next_attempt(0.0)
            assert not isinstance(attempt, meshlib.engine.Refusal)
            addresses.append(attempt.key)
            call.finish(attempt, Outcome.response(503), 0.0)
        tried[ignore] = addresses
    assert len(set(tried[True])) == 3  # the default: every retry on another host
    assert len(set(tried[False])) == 1  # the hash owner each time


def test_retry_non_idempotent_annotation_compiles_into_the_route_policy() -> None:
    retries = {"attempts": 2, "retryOn": "5xx"}
    annotated = virtual_service("reviews", {"route": [to("reviews")], "retries": retries})
    annotated["metadata"]["annotations"] = {"meshlib.io/retry-non-idempotent": "true"}
    mesh = mesh_of(service_entry("reviews", *ENDPOINTS), annotated)
    call = proceed(mesh, "POST")
    assert call.retry.retry_non_idempotent
    decision = call.retry.decide(
        Outcome.response(503), attempt=1, method="POST", replayable=True, rng=mesh.outbound.rng
    )
    assert decision.retry

    plain = mesh_of(
        service_entry("reviews", *ENDPOINTS), virtual_service("reviews", {"route": [to("reviews")], "retries": retries})
    )
    assert not proceed(plain, "POST").retry.retry_non_idempotent


def test_retry_non_idempotent_annotation_applies_to_routes_with_the_mesh_default_retries() -> None:
    annotated = virtual_service("reviews", {"route": [to("reviews")]})
    annotated["metadata"]["annotations"] = {"meshlib.io/retry-non-idempotent": "true"}
    call = proceed(mesh_of(service_entry("reviews", *ENDPOINTS), annotated), "POST")
    assert call.retry.retry_non_idempotent
    assert call.retry.attempts == 2  # the mesh default's


# ---------------------------------------------------------------------------- maxRequestsPerConnection


@pytest.mark.parametrize(("limit", "close", "warned"), [(1, True, False), (0, False, False), (2, False, True)])
def test_max_requests_per_connection_one_closes_every_connection(limit: int, close: bool, warned: bool) -> None:
    policy = {"connectionPool": {"http": {"maxRequestsPerConnection": limit}}}
    mesh = mesh_of(service_entry("reviews", *ENDPOINTS), destination_rule("reviews", (), policy))
    attempt = proceed(mesh).next_attempt(0.0)
    assert not isinstance(attempt, meshlib.engine.Refusal)
    assert attempt.close_connection is close
    assert any("maxRequestsPerConnection" in str(w) for w in mesh.snapshot.warnings) is warned


# ---------------------------------------------------------------------------- rate limits


def rate_limit(rate: str = "1/minute", backend: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "side": "CLIENT",
        "host": "reviews",
        "strategy": "MOVING_WINDOW",
        "limits": [{"rate": rate}],
    }
    if backend is not None:
        spec["backend"] = backend
    return {
        "apiVersion": "meshlib.io/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": "reviews-calls", "namespace": "default"},
        "spec": spec,
    }


def test_rate_limited_error_carries_retry_after_seconds() -> None:
    mesh = mesh_of(service_entry("reviews", *ENDPOINTS), rate_limit("1/minute"))
    assert isinstance(plan(mesh), Proceed)
    with pytest.raises(meshlib.RateLimitedError) as caught:
        plan(mesh)
    assert 0.0 < caught.value.retry_after <= 60.0


def test_global_backend_counts_in_its_storage_not_in_memory() -> None:
    backend = {"type": "GLOBAL", "storage": "memory://"}
    mesh = mesh_of(service_entry("reviews", *ENDPOINTS), rate_limit("1/minute", backend))
    limiter = mesh.outbound._limits["reviews.default.svc.cluster.local"]
    assert "memory://" in limiter._storages


@pytest.mark.parametrize("mode", ["OPEN", "CLOSED"])
def test_global_storage_down_follows_failure_mode_with_a_warning(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    backend = {"type": "GLOBAL", "storage": f"redis://{dead_address()}/0", "failureMode": mode}
    mesh = mesh_of(service_entry("reviews", *ENDPOINTS), rate_limit("1/minute", backend))
    with caplog.at_level(logging.WARNING, logger="meshlib.ratelimit"):
        if mode == "OPEN":
            for _ in range(3):  # over the 1/minute limit: nothing counts while the storage is down
                assert isinstance(plan(mesh), Proceed)
        else:
            with pytest.raises(meshlib.RateLimitedError, match="failureMode is CLOSED") as caught:
                plan(mesh)
            assert caught.value.retry_after > 0
            with pytest.raises(meshlib.RateLimitedError):
                plan(mesh)
    warnings = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(warnings) == 1  # once per outage, not per request
    assert mode in warnings[0].getMessage()
