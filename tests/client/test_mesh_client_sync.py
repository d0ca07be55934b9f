"""The sync twin: the same behaviour through ``mesh.client()`` (``MeshTransport``).

A representative subset of ``test_mesh_client.py``, against the same real loopback
upstreams: both transports run the same engines, so they must route, retry, time
out, eject, refuse and mirror alike.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from _upstreams import (
    CountingTransport,
    ResetServer,
    Upstream,
    dead_address,
    destination_rule,
    service_entry,
    to,
    upstreams,
    virtual_service,
)

import meshlib
from meshlib.engine import current_deadline

REVIEWS = "reviews.default.svc.cluster.local"
ROUND_ROBIN = {"loadBalancer": {"simple": "ROUND_ROBIN"}}
EJECT_AFTER_2 = {"outlierDetection": {"consecutive5xxErrors": 2, "interval": "1s", "baseEjectionTime": "30s"}}


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with meshlib.set_testing(True):
        yield


def corpus_docs(corpus: Path, *names: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in names:
        docs.extend(d for d in yaml.safe_load_all((corpus / name).read_text()) if d)
    return docs


def mesh_of(*docs: dict[str, Any]) -> meshlib.Mesh:
    return meshlib.Mesh.from_resources(list(docs), workload="productpage", seed=7)


def versions(responses: list[httpx.Response]) -> Counter[str]:
    return Counter(r.json()["version"] for r in responses)


def ep(address: str, version: str = "v1") -> tuple[str, str]:
    return (address, version)


# ---------------------------------------------------------------------------- routing


def test_corpus_routes_as_istio_does(corpus: Path) -> None:
    with upstreams(Upstream("r1", "v1"), Upstream("r2", "v2"), Upstream("r3", "v3"), Upstream("ratings")) as ups:
        v1, v2, v3, ratings = ups
        docs = corpus_docs(
            corpus,
            "destination-rule-all.yaml",
            "virtual-service-reviews-jason-v2-v3.yaml",
            "virtual-service-ratings-test-abort.yaml",
        )
        mesh = mesh_of(*docs, service_entry("reviews", v1, v2, v3), service_entry("ratings", ratings))
        with mesh.client() as client:
            jason = [client.get("http://reviews/", headers={"end-user": "jason"}) for _ in range(10)]
            others = [client.get("http://reviews/") for _ in range(10)]
            aborted = client.get("http://ratings/", headers={"end-user": "jason"})
            served = client.get("http://ratings/")
        assert versions(jason) == {"v2": 10}
        assert versions(others) == {"v3": 10}
        assert aborted.status_code == 500
        assert served.status_code == 200
        assert ratings.hits == 1


def test_corpus_details_fault_555(corpus: Path) -> None:
    with upstreams(Upstream("details")) as (details,):
        mesh = mesh_of(*corpus_docs(corpus, "fault-injection-details-v1.yaml"), service_entry("details", details))
        with mesh.client() as client:
            assert client.get("http://details/").status_code == 555
        assert details.hits == 0


def test_blue_green_flip_lets_the_request_in_flight_finish() -> None:
    with upstreams(Upstream("blue", "v1", mode="slow", delay=0.4), Upstream("green", "v2")) as (blue, green):
        se, dr = service_entry("reviews", blue, green), destination_rule("reviews")
        mesh = mesh_of(se, dr, virtual_service("reviews", {"route": [to("reviews", "v1")]}))
        with mesh.client() as client, ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.get, "http://reviews/")
            while blue.hits == 0:
                time.sleep(0.005)
            mesh.update([se, dr, virtual_service("reviews", {"route": [to("reviews", "v2")]})])
            flipped = [client.get("http://reviews/") for _ in range(10)]
            finished = in_flight.result()
        assert versions(flipped) == {"v2": 10}
        assert finished.json()["version"] == "v1"


def test_prefix_and_authority_rewrite() -> None:
    with upstreams(Upstream("up")) as (up,):
        mesh = mesh_of(
            service_entry("reviews", up),
            virtual_service(
                "reviews",
                {
                    "match": [{"uri": {"prefix": "/api"}}],
                    "rewrite": {"uri": "/v2", "authority": "reviews.internal"},
                    "route": [to("reviews")],
                },
            ),
        )
        with mesh.client() as client:
            client.get("http://reviews/api/items?page=2")
        seen = up.requests[-1]
        assert (seen["path"], seen["query"], seen["headers"]["host"]) == ("/v2/items", "page=2", "reviews.internal")


def test_consistent_hash_on_a_header() -> None:
    lb = {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}}
    with upstreams(Upstream("a"), Upstream("b"), Upstream("c")) as ups:
        mesh = mesh_of(service_entry("reviews", *ups), destination_rule("reviews", (), lb))
        with mesh.client() as client:
            same = {client.get("http://reviews/", headers={"x-user": "bob"}).json()["endpoint"] for _ in range(50)}
            spread = {client.get("http://reviews/", headers={"x-user": f"u{i}"}).json()["endpoint"] for i in range(30)}
        assert len(same) == 1
        assert len(spread) >= 2


# ---------------------------------------------------------------------------- retries


def test_get_retried_on_503_to_a_different_endpoint() -> None:
    with upstreams(Upstream("bad", mode="fail"), Upstream("ok1"), Upstream("ok2")) as ups:
        bad, ok1, ok2 = ups
        mesh = mesh_of(service_entry("reviews", *ups))
        with mesh.client() as client:
            responses = [client.get("http://reviews/") for _ in range(60)]
        assert all(r.status_code == 200 for r in responses)
        assert 0 < bad.hits <= 60
        assert ok1.hits + ok2.hits == 60


def test_attempts_cap_all_failing_answers_the_last_503() -> None:
    ups = (Upstream("f1", mode="fail"), Upstream("f2", mode="fail"), Upstream("f3", mode="fail"))
    with upstreams(*ups):
        mesh = mesh_of(
            service_entry("reviews", *ups),
            virtual_service("reviews", {"route": [to("reviews")], "retries": {"attempts": 2, "retryOn": "5xx"}}),
        )
        with mesh.client() as client:
            response = client.get("http://reviews/")
        hits = sorted((req["time"], u.name) for u in ups for req in u.requests)
        assert response.status_code == 503
        assert len(hits) == 3
        assert response.json()["endpoint"] == hits[-1][1]


def test_post_not_retried_after_a_reset_but_retried_after_connect_failure() -> None:
    reset = ResetServer()
    dead = dead_address()
    try:
        with upstreams(Upstream("ok")) as (ok,):
            retries = {"attempts": 2, "retryOn": "5xx,reset"}
            mesh = mesh_of(
                service_entry("reviews", ep(reset.address)),
                virtual_service("reviews", {"route": [to("reviews")], "retries": retries}),
                service_entry("ratings", ep(dead), ok),
                destination_rule("ratings", (), ROUND_ROBIN),
            )
            inner = CountingTransport()
            with mesh.client(transport=inner) as client:
                for n in (1, 2):
                    with pytest.raises(httpx.TransportError) as caught:
                        client.post("http://reviews/", content=b"charge the card")
                    assert not isinstance(caught.value, meshlib.MeshError)
                    time.sleep(0.05)
                    assert reset.accepted == n  # one connection per POST: never resent
                responses = [client.post("http://ratings/", content=f"order {i}".encode()) for i in range(4)]
            assert [r.status_code for r in responses] == [200] * 4
            assert inner.counts.to(dead) >= 2
            assert [req["body"] for req in ok.requests] == [f"order {i}" for i in range(4)]
    finally:
        reset.close()


def test_streamed_body_over_64_kib_is_not_retried() -> None:
    size = 100 * 1024

    def body() -> Iterator[bytes]:
        for i in range(size // 8192 + 1):
            yield b"x" * min(8192, size - i * 8192)

    with upstreams(Upstream("f1", mode="fail"), Upstream("f2", mode="fail")) as ups:
        mesh = mesh_of(service_entry("reviews", *ups))
        with mesh.client() as client:
            response = client.put("http://reviews/", content=body())
        assert response.status_code == 503
        assert sum(u.hits for u in ups) == 1
        assert [len(req["body"]) for u in ups for req in u.requests] == [size]


# ---------------------------------------------------------------------------- timeouts and deadlines


def test_route_timeout_raises_deadline_exceeded_in_time() -> None:
    with upstreams(Upstream("slow", mode="slow", delay=2.0)) as (slow,):
        mesh = mesh_of(
            service_entry("reviews", slow), virtual_service("reviews", {"route": [to("reviews")], "timeout": "300ms"})
        )
        with mesh.client() as client:
            started = time.monotonic()
            with pytest.raises(meshlib.DeadlineExceededError) as caught:
                client.get("http://reviews/")
            took = time.monotonic() - started
        assert 0.29 <= took < 0.6
        assert isinstance(caught.value, httpx.HTTPError)


def test_per_try_timeout_moves_on_to_a_fast_endpoint_and_the_deadline_travels() -> None:
    with upstreams(Upstream("slow", mode="slow", delay=2.0), Upstream("fast")) as (slow, fast):
        retries = {"attempts": 2, "perTryTimeout": "100ms", "retryOn": "gateway-error,connect-failure"}
        mesh = mesh_of(
            service_entry("reviews", slow, fast),
            destination_rule("reviews", (), ROUND_ROBIN),
            virtual_service("reviews", {"route": [to("reviews")], "retries": retries, "timeout": "2s"}),
        )
        with mesh.client() as client:
            for _ in range(4):
                started = time.monotonic()
                assert client.get("http://reviews/").json()["endpoint"] == "fast"
                assert time.monotonic() - started < 0.4
            assert 1500 < int(fast.requests[-1]["headers"]["x-meshlib-deadline"]) <= 2000
            token = current_deadline.set(time.monotonic() + 0.2)
            try:
                client.get("http://reviews/")
            finally:
                current_deadline.reset(token)
            assert int(fast.requests[-1]["headers"]["x-meshlib-deadline"]) <= 200
        assert slow.hits >= 2


# ---------------------------------------------------------------------------- ejection, breaker


def test_dead_endpoint_is_ejected_and_never_tried_again() -> None:
    dead = dead_address()
    with upstreams(Upstream("ok")) as (ok,):
        mesh = mesh_of(service_entry("reviews", ep(dead), ok), destination_rule("reviews", (), EJECT_AFTER_2))
        inner = CountingTransport()
        with mesh.client(transport=inner) as client:
            while inner.counts.to(dead) < 2:
                assert client.get("http://reviews/").status_code == 200
            assert mesh.outbound.destinations[(REVIEWS, None, 80)].outlier.stats().ejected == 1
            assert all(client.get("http://reviews/").status_code == 200 for _ in range(30))
        assert inner.counts.to(dead) == 2


def test_breaker_opens_then_recovers() -> None:
    ups = (Upstream("f1", mode="fail"), Upstream("f2", mode="fail"))
    with upstreams(*ups):
        mesh = mesh_of(service_entry("reviews", *ups))
        with mesh.client() as client:
            for _ in range(3):
                assert client.get("http://reviews/").status_code == 503
            breaker = mesh.outbound.destinations[(REVIEWS, None, 80)].breaker
            started = time.monotonic()
            with pytest.raises(meshlib.CircuitOpenError) as caught:
                client.get("http://reviews/")
            assert time.monotonic() - started < 0.1
            assert caught.value.response_flag == "UO"
            for u in ups:
                u.mode = "ok"
            time.sleep(breaker.stats().reset_timeout + 0.05)
            assert client.get("http://reviews/").status_code == 200
            assert breaker.state == "closed"


def test_snapshot_swap_keeps_state_unless_the_destination_changed() -> None:
    dead = dead_address()
    with upstreams(Upstream("ok"), Upstream("other")) as (ok, other):
        se = [service_entry("reviews", ep(dead), ok), service_entry("ratings", other)]
        dr = destination_rule("reviews", (), EJECT_AFTER_2)
        mesh = mesh_of(*se, dr)
        inner = CountingTransport()
        with mesh.client(transport=inner) as client:
            while inner.counts.to(dead) < 2:
                client.get("http://reviews/")
            mesh.update([*se, dr, virtual_service("ratings", {"route": [to("ratings")], "timeout": "2s"})])
            assert mesh.outbound.destinations[(REVIEWS, None, 80)].outlier.stats().ejected == 1
            assert all(client.get("http://reviews/").status_code == 200 for _ in range(10))
            assert inner.counts.to(dead) == 2
            mesh.update([*se, destination_rule("reviews", (), {"outlierDetection": {"consecutive5xxErrors": 3}})])
            assert mesh.outbound.destinations[(REVIEWS, None, 80)].outlier.stats().ejected == 0


# ---------------------------------------------------------------------------- refusals


def test_no_endpoints_passthrough_and_registry_only() -> None:
    with upstreams(Upstream("outside")) as (outside,):
        mesh = mesh_of(service_entry("ratings"), service_entry("reviews", outside))
        with mesh.client() as client:
            with pytest.raises(meshlib.NoHealthyUpstreamError):
                client.get("http://ratings/")
            assert client.get(f"http://{outside.address}/plain").status_code == 200
        closed = mesh_of(
            service_entry("reviews", outside),
            {
                "apiVersion": "meshlib.io/v1alpha1",
                "kind": "MeshConfig",
                "metadata": {"name": "mesh", "namespace": "istio-system"},
                "spec": {"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}},
            },
        )
        with closed.client() as client, pytest.raises(meshlib.UnknownHostError):
            client.get(f"http://{outside.address}/")
        assert outside.hits == 1


def test_full_connection_pool_refuses_at_once() -> None:
    pool = {"connectionPool": {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}}}
    with upstreams(Upstream("slow", mode="slow", delay=0.3)) as (slow,):
        mesh = mesh_of(service_entry("reviews", slow), destination_rule("reviews", (), pool))
        start = threading.Barrier(5)
        with mesh.client() as client:

            def call() -> tuple[str, float]:
                start.wait()
                started = time.monotonic()
                try:
                    return str(client.get("http://reviews/").status_code), time.monotonic() - started
                except meshlib.CircuitOpenError:
                    return "overflow", time.monotonic() - started

            with ThreadPoolExecutor(5) as threads:
                results = list(threads.map(lambda _: call(), range(5)))
        assert Counter(outcome for outcome, _ in results) == {"200": 2, "overflow": 3}
        assert all(took < 0.1 for outcome, took in results if outcome == "overflow")
        assert slow.hits == 2


def test_mirror_never_slows_or_fails_the_caller() -> None:
    with upstreams(Upstream("main", "v1"), Upstream("shadow", "v2", mode="slow", delay=1.0)) as (main, shadow):
        se = service_entry("reviews", main, shadow, ep(dead_address(), "v3"))
        dr = destination_rule("reviews")
        mirrored = {"route": [to("reviews", "v1")], "mirror": {"host": "reviews", "subset": "v2"}}
        mesh = mesh_of(se, dr, virtual_service("reviews", mirrored))
        with mesh.client() as client:
            client.get("http://reviews/")
            started = time.monotonic()
            response = client.post("http://reviews/orders", content=b"copy me")
            assert time.monotonic() - started < 0.3
            assert response.json()["endpoint"] == "main"
            deadline = time.monotonic() + 3
            while shadow.hits < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert shadow.requests[-1]["headers"]["host"] == "reviews-shadow"
            assert shadow.requests[-1]["body"] == "copy me"
            dead_mirror = {"route": [to("reviews", "v1")], "mirror": {"host": "reviews", "subset": "v3"}}
            mesh.update([se, dr, virtual_service("reviews", dead_mirror)])
            assert all(client.get("http://reviews/").json()["endpoint"] == "main" for _ in range(5))


def test_client_rate_limit_refuses_the_sixth_call_in_a_second() -> None:
    limit = {
        "apiVersion": "meshlib.io/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": "reviews-calls", "namespace": "default"},
        # MOVING_WINDOW counts exactly; the default SLIDING_WINDOW_COUNTER approximates the
        # previous window (limits floors its weighted count), so at a window edge it may let a 6th by.
        "spec": {"side": "CLIENT", "host": "reviews", "strategy": "MOVING_WINDOW", "limits": [{"rate": "5/second"}]},
    }
    with upstreams(Upstream("up")) as (up,):
        mesh = mesh_of(service_entry("reviews", up), limit)
        with mesh.client() as client:
            for _ in range(5):
                client.get("http://reviews/")
            with pytest.raises(meshlib.RateLimitedError):
                client.get("http://reviews/")
        assert up.hits == 5


# ---------------------------------------------------------------------------- local replies, retry and pool options


def test_fault_delay_then_abort_and_response_headers_on_local_replies() -> None:
    fault = {
        "delay": {"fixedDelay": "200ms", "percentage": {"value": 100}},
        "abort": {"httpStatus": 503, "percentage": {"value": 100}},
    }
    headers = {"response": {"set": {"x-route": "faulted"}}}
    with upstreams(Upstream("up")) as (up,):
        mesh = mesh_of(
            service_entry("reviews", up),
            virtual_service("reviews", {"fault": fault, "headers": headers, "route": [to("reviews")]}),
            virtual_service("ratings", {"redirect": {"uri": "/moved"}, "headers": headers}),
        )
        with mesh.client() as client:
            started = time.monotonic()
            aborted = client.get("http://reviews/")
            took = time.monotonic() - started
            moved = client.get("http://ratings/")
    assert aborted.status_code == 503
    assert aborted.extensions["meshlib.response_flags"] == "FI"
    assert took >= 0.2  # the delay was waited before the abort
    assert aborted.headers["x-route"] == "faulted"
    assert moved.status_code == 301
    assert moved.headers["x-route"] == "faulted"
    assert up.hits == 0


def test_retry_ignore_previous_hosts_false_retries_the_same_host() -> None:
    lb = {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}}
    retries = {"attempts": 2, "retryOn": "5xx", "retryIgnorePreviousHosts": False}
    ups = (Upstream("f1", mode="fail"), Upstream("f2", mode="fail"), Upstream("f3", mode="fail"))
    with upstreams(*ups):
        mesh = mesh_of(
            service_entry("reviews", *ups),
            destination_rule("reviews", (), lb),
            virtual_service("reviews", {"route": [to("reviews")], "retries": retries}),
        )
        with mesh.client() as client:
            assert (client.get("http://reviews/", headers={"x-user": "alice"})).status_code == 503
    assert sorted(u.hits for u in ups) == [0, 0, 3]


def test_retry_non_idempotent_annotation_retries_a_post_after_a_503() -> None:
    vs = virtual_service("reviews", {"route": [to("reviews")], "retries": {"attempts": 2, "retryOn": "5xx"}})
    vs["metadata"]["annotations"] = {"meshlib.io/retry-non-idempotent": "true"}
    with upstreams(Upstream("flaky", mode="flaky", every=2), Upstream("plain", mode="fail")) as (flaky, plain):
        mesh = mesh_of(
            service_entry("reviews", flaky),
            service_entry("ratings", plain),
            vs,
            virtual_service("ratings", {"route": [to("ratings")], "retries": {"attempts": 2, "retryOn": "5xx"}}),
        )
        with mesh.client() as client:
            client.post("http://reviews/", content=b"pay")  # hit 1: ok
            assert (client.post("http://reviews/", content=b"pay")).status_code == 200  # 503, then retried
            assert (client.post("http://ratings/", content=b"pay")).status_code == 503
    assert flaky.hits == 3
    assert [r["body"] for r in flaky.requests] == ["pay"] * 3
    assert plain.hits == 1  # without the annotation a POST is not retried after a 503


def test_max_requests_per_connection_one_sends_connection_close() -> None:
    pool = {"connectionPool": {"http": {"maxRequestsPerConnection": 1}}}
    with upstreams(Upstream("up"), Upstream("other")) as (up, other):
        mesh = mesh_of(
            service_entry("reviews", up), service_entry("ratings", other), destination_rule("reviews", (), pool)
        )
        with mesh.client() as client:
            for _ in range(3):
                assert (client.get("http://reviews/")).status_code == 200
                assert (client.get("http://ratings/")).status_code == 200
    assert [r["headers"].get("connection") for r in up.requests] == ["close"] * 3
    assert all(r["headers"].get("connection") != "close" for r in other.requests)


def test_global_rate_limit_with_its_storage_down_follows_failure_mode() -> None:
    def limit(name: str, host: str, mode: str) -> dict[str, Any]:
        backend = {"type": "GLOBAL", "storage": f"redis://{dead_address()}/0", "failureMode": mode}
        return {
            "apiVersion": "meshlib.io/v1alpha1",
            "kind": "RateLimitPolicy",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"side": "CLIENT", "host": host, "backend": backend, "limits": [{"rate": "1/minute"}]},
        }

    with upstreams(Upstream("up")) as (up,):
        mesh = mesh_of(
            service_entry("reviews", up),
            service_entry("ratings", up),
            limit("open", "reviews", "OPEN"),
            limit("closed", "ratings", "CLOSED"),
        )
        with mesh.client() as client:
            for _ in range(3):
                assert (client.get("http://reviews/")).status_code == 200
            with pytest.raises(meshlib.RateLimitedError) as caught:
                client.get("http://ratings/")
    assert caught.value.retry_after > 0
    assert up.hits == 3
