"""The mesh client against real servers: what a service gets from ``mesh.async_client()``.

Every upstream is a uvicorn server on a free loopback port, labelled v1/v2/v3 and
switchable between ok, failing, flaky, slow and reset (``tests/_upstreams.py``);
policy comes from Istio resources as YAML gives them (the real Istio corpus where
it applies). Retry backoff is off (``meshlib.set_testing``) except in the tests
that measure it. ``test_mesh_client_sync.py`` proves the same through ``mesh.client()``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from _upstreams import (
    CountingAsyncTransport,
    ResetServer,
    Upstream,
    dead_address,
    destination_rule,
    service_entry,
    to,
    upstream_processes,
    upstreams,
    virtual_service,
)

import meshlib
from meshlib.engine import Breaker, RequestView, RouteTarget, current_deadline

REVIEWS = "reviews.default.svc.cluster.local"
ROUND_ROBIN = {"loadBalancer": {"simple": "ROUND_ROBIN"}}


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with meshlib.set_testing(True):
        yield


def corpus_docs(corpus: Path, *names: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in names:
        docs.extend(d for d in yaml.safe_load_all((corpus / name).read_text()) if d)
    return docs


def mesh_of(*docs: dict[str, Any], seed: int | None = 7) -> meshlib.Mesh:
    return meshlib.Mesh.from_resources(list(docs), workload="productpage", seed=seed)


async def batched(n: int, call: Callable[[], Awaitable[httpx.Response]], size: int = 10) -> list[httpx.Response]:
    """``n`` calls, ``size`` at a time (through one client, so one connection pool)."""
    out: list[httpx.Response] = []
    for start in range(0, n, size):
        out.extend(await asyncio.gather(*(call() for _ in range(min(size, n - start)))))
    return out


def versions(responses: list[httpx.Response]) -> Counter[str]:
    return Counter(r.json()["version"] for r in responses)


def key(upstream: Upstream | str) -> str:
    """The endpoint key outlier detection and balancers use for a loopback endpoint."""
    address = upstream if isinstance(upstream, str) else upstream.address
    ip, port = address.rsplit(":", 1)
    return f"{ip}|http={port}"


def ep(address: str, version: str = "v1") -> tuple[str, str]:
    return (address, version)


async def chunks(total: int, size: int = 8192) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield bytes([65 + (sent // size) % 26]) * n
        sent += n


# ---------------------------------------------------------------------------- 1. the Istio corpus


async def test_corpus_reviews_80_20_over_5000_requests(corpus: Path) -> None:
    ups = (Upstream("r1", "v1"), Upstream("r2", "v2"), Upstream("r3", "v3"))
    with upstream_processes(*ups):
        docs = corpus_docs(corpus, "destination-rule-all.yaml", "virtual-service-reviews-80-20.yaml")
        mesh = mesh_of(*docs, service_entry("reviews", *ups))
        async with mesh.async_client() as client:
            responses = await batched(5000, lambda: client.get("http://reviews/"), size=8)
        assert all(r.status_code == 200 for r in responses)
        seen = versions(responses)
        assert seen["v3"] == 0
        assert 0.78 <= seen["v1"] / 5000 <= 0.82, seen


async def test_corpus_jason_goes_to_v2_everyone_else_to_v3(corpus: Path) -> None:
    with upstreams(Upstream("r1", "v1"), Upstream("r2", "v2"), Upstream("r3", "v3")) as (v1, v2, v3):
        docs = corpus_docs(corpus, "destination-rule-all.yaml", "virtual-service-reviews-jason-v2-v3.yaml")
        mesh = mesh_of(*docs, service_entry("reviews", v1, v2, v3))
        async with mesh.async_client() as client:
            jason = [await client.get("http://reviews/", headers={"end-user": "jason"}) for _ in range(20)]
            others = [await client.get("http://reviews/", headers={"end-user": "mary"}) for _ in range(10)]
            others += [await client.get("http://reviews/") for _ in range(10)]
        assert versions(jason) == {"v2": 20}
        assert versions(others) == {"v3": 20}
        assert v1.hits == 0


async def test_corpus_ratings_abort_500_for_jason_only(corpus: Path) -> None:
    with upstreams(Upstream("ratings", "v1")) as (ratings,):
        docs = corpus_docs(corpus, "destination-rule-all.yaml", "virtual-service-ratings-test-abort.yaml")
        mesh = mesh_of(*docs, service_entry("ratings", ratings))
        async with mesh.async_client() as client:
            aborted = await client.get("http://ratings/", headers={"end-user": "jason"})
            served = await client.get("http://ratings/", headers={"end-user": "mary"})
        assert aborted.status_code == 500
        assert aborted.extensions["meshlib.response_flags"] == "FI"
        assert served.status_code == 200
        assert served.json()["endpoint"] == "ratings"
        assert ratings.hits == 1  # the aborted request never left


async def test_corpus_details_fault_555_for_everyone(corpus: Path) -> None:
    with upstreams(Upstream("details", "v1")) as (details,):
        docs = corpus_docs(corpus, "fault-injection-details-v1.yaml")
        mesh = mesh_of(*docs, service_entry("details", details))
        async with mesh.async_client() as client:
            responses = [await client.get("http://details/", headers={"end-user": u}) for u in ("jason", "mary", "")]
        assert [r.status_code for r in responses] == [555, 555, 555]
        assert details.hits == 0


async def test_corpus_7s_delay_is_for_jason_only_and_a_delay_really_waits(corpus: Path) -> None:
    docs = corpus_docs(corpus, "destination-rule-all.yaml", "virtual-service-ratings-test-delay.yaml")
    corpus_mesh = mesh_of(*docs, service_entry("ratings", ("127.0.0.1:9", "v1")))
    router, rng = corpus_mesh.outbound.router, corpus_mesh.outbound.rng
    jason = router.route(RequestView.from_parts("GET", "http://ratings/", {"end-user": "jason"}), rng)
    mary = router.route(RequestView.from_parts("GET", "http://ratings/", {"end-user": "mary"}), rng)
    assert jason is not None
    assert jason.fault_delay == 7.0
    assert mary is not None
    assert mary.fault_delay is None

    # The same rule with 200 ms, through a real server: jason waits, everyone else does not.
    delay_rule = docs[-1]["spec"]["http"][0]
    delay_rule["fault"]["delay"]["fixedDelay"] = "200ms"
    with upstreams(Upstream("ratings", "v1")) as (ratings,):
        mesh = mesh_of(*docs, service_entry("ratings", ratings))
        async with mesh.async_client() as client:
            await client.get("http://ratings/")  # warm the connection
            started = time.monotonic()
            slow = await client.get("http://ratings/", headers={"end-user": "jason"})
            jason_took = time.monotonic() - started
            started = time.monotonic()
            fast = await client.get("http://ratings/", headers={"end-user": "mary"})
            mary_took = time.monotonic() - started
    assert slow.status_code == fast.status_code == 200
    assert jason_took >= 0.2
    assert mary_took < 0.15


# ---------------------------------------------------------------------------- 2. canary, A/B, blue-green


async def test_canary_95_5() -> None:
    with upstream_processes(Upstream("stable", "v1"), Upstream("canary", "v2")) as (v1, v2):
        mesh = mesh_of(
            service_entry("reviews", v1, v2),
            destination_rule("reviews"),
            virtual_service("reviews", {"route": [to("reviews", "v1", 95), to("reviews", "v2", 5)]}),
        )
        async with mesh.async_client() as client:
            responses = await batched(1000, lambda: client.get("http://reviews/"))
        share = versions(responses)["v2"] / 1000
        assert 0.025 <= share <= 0.075, share  # 5 % ± 3.6 standard deviations


async def test_ab_by_header() -> None:
    with upstreams(Upstream("a", "v1"), Upstream("b", "v2")) as (a, b):
        mesh = mesh_of(
            service_entry("reviews", a, b),
            destination_rule("reviews"),
            virtual_service(
                "reviews",
                {"match": [{"headers": {"x-group": {"exact": "b"}}}], "route": [to("reviews", "v2")]},
                {"route": [to("reviews", "v1")]},
            ),
        )
        async with mesh.async_client() as client:
            group_b = [await client.get("http://reviews/", headers={"x-group": "b"}) for _ in range(10)]
            group_a = [await client.get("http://reviews/", headers={"x-group": "a"}) for _ in range(10)]
        assert versions(group_b) == {"v2": 10}
        assert versions(group_a) == {"v1": 10}


async def test_blue_green_flip_at_runtime_lets_the_request_in_flight_finish() -> None:
    with upstreams(Upstream("blue", "v1", mode="slow", delay=0.4), Upstream("green", "v2")) as (blue, green):
        se, dr = service_entry("reviews", blue, green), destination_rule("reviews")
        mesh = mesh_of(se, dr, virtual_service("reviews", {"route": [to("reviews", "v1")]}))
        async with mesh.async_client() as client:
            in_flight = asyncio.create_task(client.get("http://reviews/"))
            while blue.hits == 0:
                await asyncio.sleep(0.005)
            before = mesh.version
            after = mesh.update([se, dr, virtual_service("reviews", {"route": [to("reviews", "v2")]})])
            assert after != before
            assert mesh.version == after
            flipped = [await client.get("http://reviews/") for _ in range(10)]
            finished = await in_flight
        assert versions(flipped) == {"v2": 10}
        assert finished.status_code == 200
        assert finished.json()["version"] == "v1"
        assert blue.hits == 1


# ---------------------------------------------------------------------------- 3. retries


async def test_get_retried_on_503_to_a_different_endpoint() -> None:
    with upstreams(Upstream("bad", "v1", mode="fail"), Upstream("ok1", "v1"), Upstream("ok2", "v1")) as ups:
        bad, ok1, ok2 = ups
        mesh = mesh_of(service_entry("reviews", *ups))  # no route: the mesh default retries 503 twice
        async with mesh.async_client() as client:
            responses = [await client.get("http://reviews/") for _ in range(60)]
        assert all(r.status_code == 200 for r in responses)
        assert 0 < bad.hits <= 60
        assert ok1.hits + ok2.hits == 60  # each failure was followed by exactly one retry elsewhere


async def test_attempts_cap_all_failing_answers_the_last_503() -> None:
    ups = (Upstream("f1", mode="fail"), Upstream("f2", mode="fail"), Upstream("f3", mode="fail"))
    with upstreams(*ups):
        mesh = mesh_of(
            service_entry("reviews", *ups),
            virtual_service("reviews", {"route": [to("reviews")], "retries": {"attempts": 2, "retryOn": "5xx"}}),
        )
        async with mesh.async_client() as client:
            for n in (1, 2):
                response = await client.get("http://reviews/")
                assert response.status_code == 503
                hits = sorted((req["time"], u.name) for u in ups for req in u.requests)
                assert len(hits) == 3 * n  # exactly 1 + attempts per request
                last_three = [name for _, name in hits[-3:]]
                assert len(set(last_three)) == 3  # every retry went to another endpoint
                assert response.json()["endpoint"] == last_three[-1]


async def test_post_not_retried_after_a_reset_but_get_is() -> None:
    reset = ResetServer()
    try:
        retries = {"attempts": 2, "retryOn": "5xx,reset"}
        mesh = mesh_of(
            service_entry("reviews", ep(reset.address)),
            virtual_service("reviews", {"route": [to("reviews")], "retries": retries}),
        )
        async with mesh.async_client() as client:
            for n in (1, 2, 3):
                with pytest.raises(httpx.TransportError) as caught:
                    await client.post("http://reviews/", content=b"charge the card")
                assert not isinstance(caught.value, meshlib.MeshError)  # httpx's own error: nothing retried
                await asyncio.sleep(0.05)
                assert (reset.accepted, reset.received) == (n, n)  # one connection, one request per POST
            with pytest.raises(meshlib.RetriesExhaustedError):
                await client.get("http://reviews/")
            await asyncio.sleep(0.05)
            assert reset.received == 3 + 3
    finally:
        reset.close()


async def test_post_reset_on_a_reused_connection_is_not_resent_by_httpx_either() -> None:
    # httpcore retries a request on another connection only when the pooled one turns
    # out unusable *before* anything is written (ConnectionNotAvailable); a request that
    # was written and then reset is never resent below the mesh. Checked here, for real.
    reset = ResetServer(answer_first=1)
    try:
        mesh = mesh_of(
            service_entry("reviews", ep(reset.address)),
            virtual_service("reviews", {"route": [to("reviews")], "retries": {"attempts": 2, "retryOn": "5xx,reset"}}),
        )
        async with mesh.async_client() as client:
            assert (await client.get("http://reviews/")).status_code == 200  # pools the connection
            with pytest.raises(httpx.TransportError) as caught:
                await client.post("http://reviews/", content=b"charge the card")
            assert not isinstance(caught.value, meshlib.MeshError)
            await asyncio.sleep(0.05)
            assert (reset.accepted, reset.received) == (1, 2)  # the POST went once, on the reused connection
    finally:
        reset.close()


async def test_post_retried_after_connect_failure_with_its_body() -> None:
    dead = dead_address()
    with upstreams(Upstream("ok", "v1")) as (ok,):
        mesh = mesh_of(service_entry("reviews", ep(dead), ok), destination_rule("reviews", (), ROUND_ROBIN))
        inner = CountingAsyncTransport()
        async with mesh.async_client(transport=inner) as client:
            responses = [await client.post("http://reviews/", content=f"order {i}".encode()) for i in range(4)]
        assert [r.status_code for r in responses] == [200] * 4
        assert inner.counts.to(dead) >= 2  # round robin sent half the first attempts there
        assert [req["body"] for req in ok.requests] == [f"order {i}" for i in range(4)]


async def test_retriable_4xx_retries_409() -> None:
    ups = (Upstream("c1", mode="fail", status=409), Upstream("c2", mode="fail", status=409))
    with upstreams(*ups):
        mesh = mesh_of(
            service_entry("reviews", *ups),
            service_entry("ratings", *ups),
            virtual_service(
                "reviews", {"route": [to("reviews")], "retries": {"attempts": 2, "retryOn": "retriable-4xx"}}
            ),
            virtual_service("ratings", {"route": [to("ratings")], "retries": {"attempts": 2, "retryOn": "5xx"}}),
        )
        async with mesh.async_client() as client:
            conflict = await client.put("http://reviews/", content=b"x")
            assert conflict.status_code == 409
            assert sum(u.hits for u in ups) == 3
            not_retried = await client.put("http://ratings/", content=b"x")
            assert not_retried.status_code == 409
            assert sum(u.hits for u in ups) == 4


async def test_numeric_retry_on_codes() -> None:
    with upstreams(Upstream("e500", mode="fail", status=500), Upstream("e502", mode="fail", status=502)) as ups:
        e500, e502 = ups
        retry_500 = {"attempts": 2, "retryOn": "500"}
        mesh = mesh_of(
            service_entry("reviews", e500),
            service_entry("ratings", e502),
            virtual_service("reviews", {"route": [to("reviews")], "retries": retry_500}),
            virtual_service("ratings", {"route": [to("ratings")], "retries": retry_500}),
        )
        async with mesh.async_client() as client:
            assert (await client.get("http://reviews/")).status_code == 500
            assert (await client.get("http://ratings/")).status_code == 502
        assert e500.hits == 3  # 500 is listed: retried twice
        assert e502.hits == 1  # 502 is not


async def test_retry_after_is_honoured_unless_the_deadline_is_shorter() -> None:
    flaky = Upstream("busy", mode="flaky", every=2, headers=[("retry-after", "1")])
    with upstreams(flaky), meshlib.set_testing(False):
        mesh = mesh_of(
            service_entry("reviews", flaky),
            service_entry("ratings", flaky),
            virtual_service("ratings", {"route": [to("ratings")], "timeout": "500ms"}),
        )
        async with mesh.async_client() as client:
            assert (await client.get("http://reviews/")).status_code == 200  # hit 1 ok; hit 2 will be a 503
            response = await client.get("http://reviews/")
            assert response.status_code == 200
            assert flaky.hits == 3
            first, second = flaky.requests[1]["time"], flaky.requests[2]["time"]
            assert second - first >= 1.0
            # A route timeout shorter than Retry-After: no retry, the 503 comes back at once.
            started = time.monotonic()
            refused = await client.get("http://ratings/")  # hit 4: a 503
            assert refused.status_code == 503
            assert time.monotonic() - started < 0.5
            assert flaky.hits == 4


async def test_real_backoff_delays_happen_when_testing_mode_is_off() -> None:
    ups = (Upstream("c1", mode="fail", status=409), Upstream("c2", mode="fail", status=409))

    def gaps() -> list[float]:
        times = sorted(req["time"] for u in ups for req in u.requests)
        for u in ups:
            u.requests.clear()
        return [times[i + 1] - times[i] for i in range(0, len(times), 3) for i in (i, i + 1)]

    with upstreams(*ups):
        mesh = mesh_of(
            service_entry("reviews", *ups),
            virtual_service(
                "reviews", {"route": [to("reviews")], "retries": {"attempts": 2, "retryOn": "retriable-4xx"}}
            ),
        )
        async with mesh.async_client() as client:
            for _ in range(10):
                await client.get("http://reviews/")
            testing = gaps()
            with meshlib.set_testing(False):
                for _ in range(10):
                    await client.get("http://reviews/")
            real = gaps()
    # Envoy's full jitter: retry N waits uniform [0, (2^N - 1) * 25 ms), at most 250 ms.
    assert len(real) == len(testing) == 20
    assert sum(real) > 0.15, real
    assert max(real) < 0.25 + 0.05
    assert sum(testing) < sum(real) / 2


async def test_small_streamed_body_is_resent_intact_on_retry() -> None:
    body = b"".join([bytes([65 + i]) * 1000 for i in range(5)])

    async def stream() -> AsyncIterator[bytes]:
        for i in range(5):
            yield body[i * 1000 : (i + 1) * 1000]

    with upstreams(Upstream("bad", mode="fail"), Upstream("ok")) as (bad, ok):
        mesh = mesh_of(service_entry("reviews", bad, ok), destination_rule("reviews", (), ROUND_ROBIN))
        async with mesh.async_client() as client:
            for _ in range(2):  # round robin: one of the two requests starts on the bad endpoint
                assert (await client.put("http://reviews/", content=stream())).status_code == 200
        assert bad.hits >= 1
        assert ok.hits == 2
        assert {req["body"] for u in (bad, ok) for req in u.requests} == {body.decode()}


async def test_streamed_body_over_64_kib_is_not_retried() -> None:
    size = 100 * 1024
    with upstreams(Upstream("f1", mode="fail"), Upstream("f2", mode="fail")) as ups:
        mesh = mesh_of(service_entry("reviews", *ups))
        async with mesh.async_client() as client:
            response = await client.put("http://reviews/", content=chunks(size))
        assert response.status_code == 503
        assert sum(u.hits for u in ups) == 1
        (received,) = [req["body"] for u in ups for req in u.requests]
        assert len(received) == size  # sent once, whole


# ---------------------------------------------------------------------------- 4. timeouts and deadlines


async def test_route_timeout_raises_deadline_exceeded_in_time() -> None:
    with upstreams(Upstream("slow", mode="slow", delay=2.0)) as (slow,):
        mesh = mesh_of(
            service_entry("reviews", slow), virtual_service("reviews", {"route": [to("reviews")], "timeout": "300ms"})
        )
        async with mesh.async_client() as client:
            started = time.monotonic()
            with pytest.raises(meshlib.DeadlineExceededError) as caught:
                await client.get("http://reviews/")
            took = time.monotonic() - started
        assert 0.29 <= took < 0.6
        assert isinstance(caught.value, httpx.TransportError)
        assert isinstance(caught.value, httpx.HTTPError)
        assert caught.value.response_flag == "UT"
        assert caught.value.request.url.host == "reviews"


async def test_per_try_timeout_moves_on_to_a_fast_endpoint() -> None:
    with upstreams(Upstream("slow", mode="slow", delay=2.0), Upstream("fast")) as (slow, fast):
        retries = {"attempts": 2, "perTryTimeout": "100ms", "retryOn": "gateway-error,connect-failure"}
        mesh = mesh_of(
            service_entry("reviews", slow, fast),
            destination_rule("reviews", (), ROUND_ROBIN),
            virtual_service("reviews", {"route": [to("reviews")], "retries": retries}),
        )
        async with mesh.async_client() as client:
            for _ in range(4):
                started = time.monotonic()
                response = await client.get("http://reviews/")
                assert response.status_code == 200
                assert response.json()["endpoint"] == "fast"
                assert time.monotonic() - started < 0.4
        assert slow.hits >= 2


async def test_remaining_deadline_travels_in_a_header() -> None:
    with upstreams(Upstream("up")) as (up,):
        mesh = mesh_of(
            service_entry("reviews", up), virtual_service("reviews", {"route": [to("reviews")], "timeout": "2s"})
        )
        async with mesh.async_client() as client:
            await client.get("http://reviews/")
            sent = int(up.requests[-1]["headers"]["x-meshlib-deadline"])
            assert 1500 < sent <= 2000
            token = current_deadline.set(time.monotonic() + 0.2)
            try:
                await client.get("http://reviews/")
            finally:
                current_deadline.reset(token)
            assert 0 < int(up.requests[-1]["headers"]["x-meshlib-deadline"]) <= 200


async def test_deadline_header_follows_mesh_config() -> None:
    def mesh_config(propagation: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": "meshlib.io/v1alpha1",
            "kind": "MeshConfig",
            "metadata": {"name": "mesh", "namespace": "istio-system"},
            "spec": {"deadlinePropagation": propagation},
        }

    with upstreams(Upstream("up")) as (up,):
        timed = virtual_service("reviews", {"route": [to("reviews")], "timeout": "1s"})
        renamed = mesh_of(service_entry("reviews", up), timed, mesh_config({"header": "x-request-deadline"}))
        off = mesh_of(service_entry("reviews", up), timed, mesh_config({"enabled": False}))
        async with renamed.async_client() as a, off.async_client() as b:
            await a.get("http://reviews/")
            assert 0 < int(up.requests[-1]["headers"]["x-request-deadline"]) <= 1000
            assert "x-meshlib-deadline" not in up.requests[-1]["headers"]
            await b.get("http://reviews/")
            assert not {"x-meshlib-deadline", "x-request-deadline"} & set(up.requests[-1]["headers"])


async def test_caller_deadline_shortens_the_route_timeout() -> None:
    with upstreams(Upstream("slow", mode="slow", delay=2.0)) as (slow,):
        mesh = mesh_of(
            service_entry("reviews", slow), virtual_service("reviews", {"route": [to("reviews")], "timeout": "5s"})
        )
        async with mesh.async_client() as client:
            token = current_deadline.set(time.monotonic() + 0.2)
            started = time.monotonic()
            try:
                with pytest.raises(meshlib.DeadlineExceededError):
                    await client.get("http://reviews/")
            finally:
                current_deadline.reset(token)
            assert time.monotonic() - started < 0.5


# ---------------------------------------------------------------------------- 5. dead endpoints, outlier ejection


async def test_dead_endpoint_is_ejected_and_never_tried_again() -> None:
    dead = dead_address()
    outlier = {"outlierDetection": {"consecutive5xxErrors": 2, "interval": "1s", "baseEjectionTime": "30s"}}
    with upstreams(Upstream("ok")) as (ok,):
        mesh = mesh_of(service_entry("reviews", ep(dead), ok), destination_rule("reviews", (), outlier))
        inner = CountingAsyncTransport()
        async with mesh.async_client(transport=inner) as client:
            for _ in range(20):
                assert (await client.get("http://reviews/")).status_code == 200
                if inner.counts.to(dead) >= 2:
                    break
            assert inner.counts.to(dead) == 2
            detector = mesh.outbound.destinations[(REVIEWS, None, 80)].outlier
            assert detector.stats().ejected == 1
            assert detector.ejected_until(key(dead)) is not None
            responses = [await client.get("http://reviews/") for _ in range(30)]
        assert all(r.status_code == 200 for r in responses)
        assert inner.counts.to(dead) == 2  # ejected: no attempt went there again


async def test_one_endpoint_failing_half_the_time_is_ejected_and_callers_barely_notice() -> None:
    bad = Upstream("bad", mode="chance", rate=0.5)
    outlier = {"outlierDetection": {"consecutive5xxErrors": 3, "interval": "1s", "baseEjectionTime": "30s"}}
    with upstream_processes(bad, Upstream("ok1"), Upstream("ok2")) as ups:
        mesh = mesh_of(service_entry("reviews", *ups), destination_rule("reviews", (), outlier))
        async with mesh.async_client() as client:
            responses = await batched(1000, lambda: client.get("http://reviews/"))
        ok = sum(r.status_code == 200 for r in responses)
        assert ok / 1000 >= 0.999
        stats = mesh.outbound.destinations[(REVIEWS, None, 80)].outlier.stats()
        assert stats.ejections_total >= 1
        assert stats.ejected == 1
        assert mesh.outbound.destinations[(REVIEWS, None, 80)].outlier.ejected_until(key(bad)) is not None


# ---------------------------------------------------------------------------- 6. 503 storm, breaker


async def test_503_storm_retries_stay_within_the_budget() -> None:
    ups = (Upstream("f1", mode="fail"), Upstream("f2", mode="fail"), Upstream("f3", mode="fail"))
    with upstreams(*ups):
        mesh = mesh_of(service_entry("reviews", *ups))  # default retries: 503 twice; default budget
        dest = mesh.outbound.destination(RouteTarget(REVIEWS), 80)
        # Keep the breaker from opening (it is not configurable from policy) so the budget alone is measured.
        dest.breaker = Breaker(fail_max=1_000_000)
        assert dest.budget is not None
        async with mesh.async_client() as client:
            responses = [await client.get("http://reviews/") for _ in range(300)]
        assert all(r.status_code == 503 for r in responses)
        hits = sum(u.hits for u in ups)
        reserve = dest.budget.min_retries_per_second * dest.budget.ttl  # the budget's minimum: 10/s over 10 s
        assert 300 < hits <= 1.2 * 300 + reserve
        assert dest.budget.stats(time.monotonic()).rejected > 0


async def test_breaker_opens_then_recovers_when_the_upstream_heals() -> None:
    ups = (Upstream("f1", mode="fail"), Upstream("f2", mode="fail"))
    with upstreams(*ups):
        mesh = mesh_of(service_entry("reviews", *ups))
        async with mesh.async_client() as client:
            for _ in range(3):  # 3 tries each: the 7th consecutive failure opens the breaker
                assert (await client.get("http://reviews/")).status_code == 503
            breaker = mesh.outbound.destinations[(REVIEWS, None, 80)].breaker
            assert breaker.state == "open"
            hits = sum(u.hits for u in ups)
            started = time.monotonic()
            with pytest.raises(meshlib.CircuitOpenError) as caught:
                await client.get("http://reviews/")
            assert time.monotonic() - started < 0.1
            assert caught.value.response_flag == "UO"
            assert sum(u.hits for u in ups) == hits  # refused before leaving
            for u in ups:
                u.mode = "ok"
            await asyncio.sleep(breaker.stats().reset_timeout + 0.05)  # the penalty (1 s to 1.5 s by default)
            assert (await client.get("http://reviews/")).status_code == 200
            assert breaker.state == "closed"


# ---------------------------------------------------------------------------- 7. no endpoints, passthrough


async def test_no_endpoints_fails_at_once() -> None:
    with upstreams(Upstream("only", "v1")) as (only,):
        empty = service_entry("ratings")
        mesh = mesh_of(
            empty,
            service_entry("reviews", only),
            destination_rule("reviews"),
            virtual_service("reviews", {"route": [to("reviews", "v3")]}),  # no endpoint is labelled v3
        )
        async with mesh.async_client() as client:
            for url in ("http://ratings/", "http://reviews/"):
                started = time.monotonic()
                with pytest.raises(meshlib.NoHealthyUpstreamError) as caught:
                    await client.get(url)
                assert time.monotonic() - started < 0.1
                assert caught.value.response_flag == "UH"
        assert only.hits == 0


async def test_host_outside_the_mesh_passes_through_and_registry_only_refuses_it() -> None:
    with upstreams(Upstream("outside")) as (outside,):
        open_mesh = mesh_of(service_entry("reviews", outside))
        async with open_mesh.async_client() as client:
            response = await client.get(f"http://{outside.address}/plain?q=1")
        assert response.status_code == 200
        assert outside.requests[-1]["path"] == "/plain"
        assert outside.requests[-1]["query"] == "q=1"
        assert "x-meshlib-deadline" not in outside.requests[-1]["headers"]

        closed = mesh_of(
            service_entry("reviews", outside),
            {
                "apiVersion": "meshlib.io/v1alpha1",
                "kind": "MeshConfig",
                "metadata": {"name": "mesh", "namespace": "istio-system"},
                "spec": {"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}},
            },
        )
        async with closed.async_client() as client:
            with pytest.raises(meshlib.UnknownHostError) as caught:
                await client.get(f"http://{outside.address}/")
            assert (await client.get("http://reviews/")).status_code == 200
        assert isinstance(caught.value, httpx.TransportError)
        assert caught.value.request.url.port == outside.port
        assert outside.hits == 2


async def test_dns_service_entry_without_endpoints_connects_to_the_host_itself() -> None:
    # Istio's way to put an external API in the mesh: resolution DNS, no endpoints; the
    # connection goes to the host's own address, on the port the request named. (A name
    # that resolves here without network: 127.0.0.1 is its own DNS answer.)
    with upstreams(Upstream("api")) as (api,):
        external = {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": "api", "namespace": "default"},
            "spec": {
                "hosts": ["127.0.0.1"],
                "location": "MESH_EXTERNAL",
                "resolution": "DNS",
                "ports": [{"number": api.port, "name": "http", "protocol": "HTTP"}],
            },
        }
        route = {"route": [to("127.0.0.1")], "timeout": "2s"}
        mesh = mesh_of(external, virtual_service("127.0.0.1", route, name="api"))
        async with mesh.async_client() as client:
            response = await client.get(f"http://127.0.0.1:{api.port}/v1/items")
        assert response.status_code == 200
        assert api.requests[-1]["path"] == "/v1/items"
        assert "x-meshlib-deadline" in api.requests[-1]["headers"]  # the mesh's route applied


# ---------------------------------------------------------------------------- 8. connection pool


async def test_full_connection_pool_refuses_at_once() -> None:
    pool = {"connectionPool": {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}}}
    with upstreams(Upstream("slow", mode="slow", delay=0.3)) as (slow,):
        mesh = mesh_of(service_entry("reviews", slow), destination_rule("reviews", (), pool))
        async with mesh.async_client() as client:

            async def call() -> tuple[str, float]:
                started = time.monotonic()
                try:
                    response = await client.get("http://reviews/")
                except meshlib.CircuitOpenError:
                    return "overflow", time.monotonic() - started
                return str(response.status_code), time.monotonic() - started

            results = await asyncio.gather(*(call() for _ in range(5)))
        outcomes = Counter(outcome for outcome, _ in results)
        assert outcomes == {"200": 2, "overflow": 3}  # one sending, one queued, three refused
        assert all(took < 0.1 for outcome, took in results if outcome == "overflow")
        assert slow.hits == 2


async def test_a_response_being_read_holds_its_connection_slot() -> None:
    pool = {"connectionPool": {"tcp": {"maxConnections": 1}}}
    with upstreams(Upstream("up")) as (up,):
        mesh = mesh_of(service_entry("reviews", up), destination_rule("reviews", (), pool))
        async with mesh.async_client() as client:
            async with client.stream("GET", "http://reviews/") as streaming:
                waiting = asyncio.create_task(client.get("http://reviews/"))
                await asyncio.sleep(0.2)
                assert not waiting.done()  # queued: the one connection is still reading a body
                assert up.hits == 1
                await streaming.aread()
            assert (await waiting).status_code == 200
        stats = mesh.outbound.destinations[(REVIEWS, None, 80)].pool.stats()
        assert (stats.active, stats.pending) == (0, 0)
        assert mesh.outbound.destinations[(REVIEWS, None, 80)].balancer.in_flight.as_dict() == {}


# ---------------------------------------------------------------------------- 9. mirroring


async def test_mirror_copies_go_to_v2_without_slowing_or_failing_the_caller() -> None:
    with upstreams(Upstream("main", "v1"), Upstream("shadow", "v2", mode="slow", delay=1.0)) as (main, shadow):
        dead = dead_address()
        se = service_entry("reviews", main, shadow, ep(dead, "v3"))
        mirrored = {"route": [to("reviews", "v1")], "mirror": {"host": "reviews", "subset": "v2"}}
        mesh = mesh_of(se, destination_rule("reviews"), virtual_service("reviews", mirrored))
        async with mesh.async_client() as client:
            await client.get("http://reviews/")  # warm the connection
            started = time.monotonic()
            response = await client.post("http://reviews/orders", content=b"copy me")
            took = time.monotonic() - started
            assert response.json()["endpoint"] == "main"
            assert took < 0.3
            while shadow.hits < 2:
                await asyncio.sleep(0.01)
            copy = shadow.requests[-1]
            assert copy["headers"]["host"] == "reviews-shadow"
            assert copy["path"] == "/orders"
            assert copy["body"] == "copy me"

            dead_mirror = {"route": [to("reviews", "v1")], "mirror": {"host": "reviews", "subset": "v3"}}
            mesh.update([se, destination_rule("reviews"), virtual_service("reviews", dead_mirror)])
            responses = [await client.get("http://reviews/") for _ in range(5)]
            assert all(r.status_code == 200 and r.json()["endpoint"] == "main" for r in responses)


# ---------------------------------------------------------------------------- 10. client rate limit


async def test_client_rate_limit_refuses_the_sixth_call_in_a_second() -> None:
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
        async with mesh.async_client() as client:
            for _ in range(5):
                assert (await client.get("http://reviews/")).status_code == 200
            with pytest.raises(meshlib.RateLimitedError) as caught:
                await client.get("http://reviews/")
        assert caught.value.response_flag == "RL"
        assert 0 < caught.value.retry_after <= 1.0
        assert caught.value.request.url.host == "reviews"
        assert up.hits == 5


# ---------------------------------------------------------------------------- 11. rewrite


async def test_prefix_and_authority_rewrite() -> None:
    with upstreams(Upstream("up", "v1")) as (up,):
        mesh = mesh_of(
            service_entry("reviews", up),
            virtual_service(
                "reviews",
                {"match": [{"uri": {"prefix": "/api"}}], "rewrite": {"uri": "/v2"}, "route": [to("reviews")]},
                {
                    "match": [{"uri": {"prefix": "/old"}}],
                    "rewrite": {"authority": "reviews.internal"},
                    "route": [to("reviews")],
                },
            ),
        )
        async with mesh.async_client() as client:
            await client.get("http://reviews/api/items?page=2")
            assert (up.requests[-1]["path"], up.requests[-1]["query"]) == ("/v2/items", "page=2")
            await client.get("http://reviews/old/x")
            assert up.requests[-1]["headers"]["host"] == "reviews.internal"
            assert up.requests[-1]["path"] == "/old/x"


# ---------------------------------------------------------------------------- 12. consistent hash


async def test_consistent_hash_on_a_header() -> None:
    lb = {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}}
    with upstreams(Upstream("a"), Upstream("b"), Upstream("c")) as ups:
        mesh = mesh_of(service_entry("reviews", *ups), destination_rule("reviews", (), lb))
        async with mesh.async_client() as client:
            same = [await client.get("http://reviews/", headers={"x-user": "alice"}) for _ in range(50)]
            spread = [await client.get("http://reviews/", headers={"x-user": f"user-{i}"}) for i in range(30)]
        assert len({r.json()["endpoint"] for r in same}) == 1
        assert len({r.json()["endpoint"] for r in spread}) >= 2


# ---------------------------------------------------------------------------- 13. snapshot swaps keep state


async def test_snapshot_swap_keeps_state_unless_the_destination_changed() -> None:
    dead = dead_address()
    outlier = {"outlierDetection": {"consecutive5xxErrors": 2, "interval": "1s", "baseEjectionTime": "30s"}}
    with upstreams(Upstream("ok"), Upstream("other")) as (ok, other):
        se = [service_entry("reviews", ep(dead), ok), service_entry("ratings", other)]
        mesh = mesh_of(*se, destination_rule("reviews", (), outlier))
        inner = CountingAsyncTransport()
        async with mesh.async_client(transport=inner) as client:
            while inner.counts.to(dead) < 2:
                assert (await client.get("http://reviews/")).status_code == 200
            dest = mesh.outbound.destinations[(REVIEWS, None, 80)]
            assert dest.outlier.stats().ejected == 1
            breaker = dest.breaker

            # An unrelated change (a route for another host), twice, with no traffic between.
            mesh.update(
                [
                    *se,
                    destination_rule("reviews", (), outlier),
                    virtual_service("ratings", {"route": [to("ratings")], "timeout": "2s"}),
                ]
            )
            mesh.update(
                [
                    *se,
                    destination_rule("reviews", (), outlier),
                    virtual_service("ratings", {"route": [to("ratings")], "timeout": "3s"}),
                ]
            )
            kept = mesh.outbound.destinations[(REVIEWS, None, 80)]
            assert kept is not dest
            assert kept.outlier.stats().ejected == 1
            assert kept.breaker is breaker
            for _ in range(10):
                assert (await client.get("http://reviews/")).status_code == 200
            assert inner.counts.to(dead) == 2

            # A change to this destination's DestinationRule: a new cluster, fresh state.
            changed = {"outlierDetection": {"consecutive5xxErrors": 3, "interval": "1s", "baseEjectionTime": "30s"}}
            mesh.update([*se, destination_rule("reviews", (), changed)])
            fresh = mesh.outbound.destinations[(REVIEWS, None, 80)]
            assert fresh.outlier.stats().ejected == 0
            assert fresh.breaker is breaker  # no policy configures the breaker: it always carries on
            while inner.counts.to(dead) < 5:
                assert (await client.get("http://reviews/")).status_code == 200
            assert fresh.outlier.stats().ejected == 1


# ---------------------------------------------------------------------------- 14. local replies, retry and pool options


async def test_fault_delay_then_abort_and_response_headers_on_local_replies() -> None:
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
        async with mesh.async_client() as client:
            started = time.monotonic()
            aborted = await client.get("http://reviews/")
            took = time.monotonic() - started
            moved = await client.get("http://ratings/")
    assert aborted.status_code == 503
    assert aborted.extensions["meshlib.response_flags"] == "FI"
    assert took >= 0.2  # the delay was waited before the abort
    assert aborted.headers["x-route"] == "faulted"
    assert moved.status_code == 301
    assert moved.headers["x-route"] == "faulted"
    assert up.hits == 0


async def test_retry_ignore_previous_hosts_false_retries_the_same_host() -> None:
    lb = {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}}
    retries = {"attempts": 2, "retryOn": "5xx", "retryIgnorePreviousHosts": False}
    ups = (Upstream("f1", mode="fail"), Upstream("f2", mode="fail"), Upstream("f3", mode="fail"))
    with upstreams(*ups):
        mesh = mesh_of(
            service_entry("reviews", *ups),
            destination_rule("reviews", (), lb),
            virtual_service("reviews", {"route": [to("reviews")], "retries": retries}),
        )
        async with mesh.async_client() as client:
            assert (await client.get("http://reviews/", headers={"x-user": "alice"})).status_code == 503
    assert sorted(u.hits for u in ups) == [0, 0, 3]


async def test_retry_non_idempotent_annotation_retries_a_post_after_a_503() -> None:
    vs = virtual_service("reviews", {"route": [to("reviews")], "retries": {"attempts": 2, "retryOn": "5xx"}})
    vs["metadata"]["annotations"] = {"meshlib.io/retry-non-idempotent": "true"}
    with upstreams(Upstream("flaky", mode="flaky", every=2), Upstream("plain", mode="fail")) as (flaky, plain):
        mesh = mesh_of(
            service_entry("reviews", flaky),
            service_entry("ratings", plain),
            vs,
            virtual_service("ratings", {"route": [to("ratings")], "retries": {"attempts": 2, "retryOn": "5xx"}}),
        )
        async with mesh.async_client() as client:
            await client.post("http://reviews/", content=b"pay")  # hit 1: ok
            assert (await client.post("http://reviews/", content=b"pay")).status_code == 200  # 503, then retried
            assert (await client.post("http://ratings/", content=b"pay")).status_code == 503
    assert flaky.hits == 3
    assert [r["body"] for r in flaky.requests] == ["pay"] * 3
    assert plain.hits == 1  # without the annotation a POST is not retried after a 503


async def test_max_requests_per_connection_one_sends_connection_close() -> None:
    pool = {"connectionPool": {"http": {"maxRequestsPerConnection": 1}}}
    with upstreams(Upstream("up"), Upstream("other")) as (up, other):
        mesh = mesh_of(
            service_entry("reviews", up), service_entry("ratings", other), destination_rule("reviews", (), pool)
        )
        async with mesh.async_client() as client:
            for _ in range(3):
                assert (await client.get("http://reviews/")).status_code == 200
                assert (await client.get("http://ratings/")).status_code == 200
    assert [r["headers"].get("connection") for r in up.requests] == ["close"] * 3
    assert all(r["headers"].get("connection") != "close" for r in other.requests)


async def test_global_rate_limit_with_its_storage_down_follows_failure_mode() -> None:
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
        async with mesh.async_client() as client:
            for _ in range(3):
                assert (await client.get("http://reviews/")).status_code == 200
            with pytest.raises(meshlib.RateLimitedError) as caught:
                await client.get("http://ratings/")
    assert caught.value.retry_after > 0
    assert up.hits == 3


async def test_default_inner_transport_is_the_fast_one_and_maps_errors_like_httpx() -> None:
    from meshlib.client._fasthttp import FastAsyncTransport

    mesh = mesh_of(service_entry("reviews", ("127.0.0.1:9", "v1")))
    transport = meshlib.AsyncMeshTransport(mesh)
    assert isinstance(transport._inner, FastAsyncTransport)
    dead = dead_address()
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.ConnectError):  # passthrough: httpx's own exception
            await client.get(f"http://{dead}/")
