"""The outbound listener: an unchanged app's HTTP proxy gets what ``mesh.async_client()`` gets in-process.

The same expectations as ``tests/client/test_mesh_client.py`` (canary split, header
routing, retries, outlier ejection, client rate limit, route timeout, no healthy
upstream, fault injection), now through a real ``Sidecar`` on loopback: the app is an
``httpx.Client(proxy=...)``, or a plain request with the mesh host in ``Host``. Where
the in-process client raises (``DeadlineExceededError``...), the sidecar answers what
Envoy does: a local reply whose ``x-meshlib-response-flags`` names the flag.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import meshlib
from tests._upstreams import (
    ResetServer,
    Upstream,
    dead_address,
    destination_rule,
    service_entry,
    to,
    upstreams,
    virtual_service,
)
from tests.sidecar._sidecar import running_sidecar, wait_for

FLAGS = "x-meshlib-response-flags"
REVIEWS = "reviews.default.svc.cluster.local"
ROUND_ROBIN = {"loadBalancer": {"simple": "ROUND_ROBIN"}}


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with meshlib.set_testing(True):
        yield


def mesh_of(*docs: dict[str, Any]) -> meshlib.Mesh:
    return meshlib.Mesh.from_resources(list(docs), workload="productpage", seed=7)


def corpus_docs(corpus: Path, *names: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in names:
        docs.extend(d for d in yaml.safe_load_all((corpus / name).read_text()) if d)
    return docs


def versions(responses: list[httpx.Response]) -> Counter[str]:
    return Counter(r.json()["version"] for r in responses)


def cluster(admin: httpx.Response, host: str = REVIEWS, subset: str | None = None) -> dict[str, Any]:
    assert admin.status_code == 200
    (found,) = [c for c in admin.json()["clusters"] if c["host"] == host and c["subset"] == subset]
    return dict(found)


# ---------------------------------------------------------------------------- routing


def test_corpus_reviews_80_20_split_over_400_requests(corpus: Path) -> None:
    ups = (Upstream("r1", "v1"), Upstream("r2", "v2"), Upstream("r3", "v3"))
    with upstreams(*ups):
        docs = corpus_docs(corpus, "destination-rule-all.yaml", "virtual-service-reviews-80-20.yaml")
        with running_sidecar(mesh_of(*docs, service_entry("reviews", *ups))) as sidecar, sidecar.client() as app:
            responses = [app.get("http://reviews/") for _ in range(400)]
    assert {r.status_code for r in responses} == {200}
    seen = versions(responses)
    assert seen["v3"] == 0
    assert 0.72 <= seen["v1"] / 400 <= 0.88, seen  # 80 % ± 4 standard deviations (2 points each)


def test_a_plain_request_with_a_mesh_host_header_is_routed_too() -> None:
    # No proxy settings at all: origin-form, the mesh host in Host (what an app gets from DNS tricks).
    with upstreams(Upstream("a", "v1"), Upstream("b", "v2")) as (a, b):
        mesh = mesh_of(
            service_entry("reviews", a, b),
            destination_rule("reviews"),
            virtual_service("reviews", {"route": [to("reviews", "v2")]}),
        )
        with running_sidecar(mesh) as sidecar, httpx.Client(base_url=sidecar.proxy) as app:
            responses = [app.get("/items?page=2", headers={"host": "reviews"}) for _ in range(5)]
    assert versions(responses) == {"v2": 5}
    assert a.hits == 0
    assert [(r["path"], r["query"], r["headers"]["host"]) for r in b.requests] == [("/items", "page=2", "reviews")] * 5


def test_header_based_routing() -> None:
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
        with running_sidecar(mesh) as sidecar, sidecar.client() as app:
            group_b = [app.get("http://reviews/", headers={"x-group": "b"}) for _ in range(10)]
            group_a = [app.get("http://reviews/", headers={"x-group": "a"}) for _ in range(10)]
            nobody = [app.get("http://reviews/") for _ in range(5)]
    assert versions(group_b) == {"v2": 10}
    assert versions(group_a) == {"v1": 10}
    assert versions(nobody) == {"v1": 5}


def test_corpus_fault_abort_for_jason_never_leaves_the_sidecar(corpus: Path) -> None:
    with upstreams(Upstream("ratings", "v1")) as (ratings,):
        docs = corpus_docs(corpus, "destination-rule-all.yaml", "virtual-service-ratings-test-abort.yaml")
        with running_sidecar(mesh_of(*docs, service_entry("ratings", ratings))) as sidecar, sidecar.client() as app:
            aborted = app.get("http://ratings/", headers={"end-user": "jason"})
            served = app.get("http://ratings/", headers={"end-user": "mary"})
    assert aborted.status_code == 500
    assert served.status_code == 200
    assert served.json()["endpoint"] == "ratings"
    assert ratings.hits == 1  # the aborted request never left


# ---------------------------------------------------------------------------- retries


def test_a_flaky_upstream_is_retried_and_the_app_only_sees_successes() -> None:
    flaky = Upstream("flaky", mode="flaky", every=2)  # every 2nd request answers 503
    with (
        upstreams(flaky),
        running_sidecar(mesh_of(service_entry("reviews", flaky))) as sidecar,
        sidecar.client() as app,
    ):
        responses = [app.get("http://reviews/") for _ in range(20)]
        clusters = sidecar.admin("/clusters")
    assert [r.status_code for r in responses] == [200] * 20
    assert flaky.hits == 39  # requests 2..20 each met a 503 first, then the mesh's default retry
    assert cluster(clusters)["retries"] == 19


def test_a_503_is_retried_on_a_different_endpoint() -> None:
    with upstreams(Upstream("bad", "v1", mode="fail"), Upstream("ok1", "v1"), Upstream("ok2", "v1")) as ups:
        bad, ok1, ok2 = ups
        with running_sidecar(mesh_of(service_entry("reviews", *ups))) as sidecar, sidecar.client() as app:
            responses = [app.get("http://reviews/") for _ in range(30)]
    assert all(r.status_code == 200 for r in responses)
    assert 0 < bad.hits <= 30
    assert ok1.hits + ok2.hits == 30  # each failure was followed by exactly one retry elsewhere


def test_a_post_is_retried_after_a_connect_failure_with_its_whole_body() -> None:
    dead = dead_address()
    with upstreams(Upstream("ok", "v1")) as (ok,):
        mesh = mesh_of(service_entry("reviews", (dead, "v1"), ok), destination_rule("reviews", (), ROUND_ROBIN))
        with running_sidecar(mesh) as sidecar, sidecar.client() as app:
            responses = [app.post("http://reviews/", content=f"order {i}".encode()) for i in range(4)]
            clusters = sidecar.admin("/clusters")
    assert [r.status_code for r in responses] == [200] * 4
    assert [req["body"] for req in ok.requests] == [f"order {i}" for i in range(4)]
    assert cluster(clusters)["retries"] >= 2  # round robin sent half the first attempts to the dead one


def test_resets_exhaust_the_retries_into_a_503_with_a_flag() -> None:
    reset = ResetServer()
    try:
        retries = {"attempts": 2, "retryOn": "5xx,reset"}
        mesh = mesh_of(
            service_entry("reviews", (reset.address, "v1")),
            virtual_service("reviews", {"route": [to("reviews")], "retries": retries}),
        )
        with running_sidecar(mesh) as sidecar, sidecar.client() as app:
            response = app.get("http://reviews/")
            wait_for(lambda: reset.received == 3, what="the first try and two retries")
            posted = app.post("http://reviews/", content=b"charge the card")
            wait_for(lambda: reset.received == 4, what="the POST")
            time.sleep(0.05)  # and nothing after it
    finally:
        reset.close()
    assert response.status_code == 503
    assert response.headers[FLAGS] == "URX"
    assert posted.status_code == 503  # a POST that reached the upstream is never resent
    assert posted.headers[FLAGS] == "UC"
    assert reset.received == 4


# ---------------------------------------------------------------------------- outlier ejection


def test_a_failing_endpoint_is_ejected_and_admin_clusters_shows_it() -> None:
    outlier = {"outlierDetection": {"consecutive5xxErrors": 2, "interval": "1s", "baseEjectionTime": "30s"}}
    with upstreams(Upstream("bad", mode="fail"), Upstream("ok")) as (bad, ok):
        mesh = mesh_of(service_entry("reviews", bad, ok), destination_rule("reviews", (), {**outlier, **ROUND_ROBIN}))
        with running_sidecar(mesh) as sidecar, sidecar.client() as app:
            assert sidecar.admin("/clusters").json() == {"clusters": []}  # no destination met yet
            responses = [app.get("http://reviews/") for _ in range(10)]
            assert bad.hits == 2
            clusters = cluster(sidecar.admin("/clusters"))
            later = [app.get("http://reviews/") for _ in range(20)]
    assert all(r.status_code == 200 for r in responses + later)  # each 503 was retried on the healthy one
    assert bad.hits == 2  # ejected: never tried again
    health = {e["address"]: (e["healthy"], e["ejected_for"]) for e in clusters["endpoints"]}
    assert health[ok.address] == (True, None)
    healthy, ejected_for = health[bad.address]
    assert healthy is False
    assert 25 < ejected_for <= 30
    assert clusters["ejections"] == 1


# ---------------------------------------------------------------------------- local replies


def test_client_rate_limit_answers_429_with_the_flag() -> None:
    limit = {
        "apiVersion": "meshlib.io/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": "reviews-calls", "namespace": "default"},
        "spec": {"side": "CLIENT", "host": "reviews", "strategy": "MOVING_WINDOW", "limits": [{"rate": "5/second"}]},
    }
    up = Upstream("up")
    with (
        upstreams(up),
        running_sidecar(mesh_of(service_entry("reviews", up), limit)) as sidecar,
        sidecar.client() as app,
    ):
        responses = [app.get("http://reviews/") for _ in range(6)]
    assert [r.status_code for r in responses] == [200] * 5 + [429]
    assert responses[-1].headers[FLAGS] == "RL"
    assert up.hits == 5


def test_route_timeout_answers_504_ut_in_time() -> None:
    with upstreams(Upstream("slow", mode="slow", delay=2.0)) as (slow,):
        mesh = mesh_of(
            service_entry("reviews", slow), virtual_service("reviews", {"route": [to("reviews")], "timeout": "300ms"})
        )
        with running_sidecar(mesh) as sidecar, sidecar.client() as app:
            app.get(f"{sidecar.admin_url}/ready")  # warm the client's own connection
            started = time.monotonic()
            response = app.get("http://reviews/")
            took = time.monotonic() - started
    assert response.status_code == 504
    assert response.headers[FLAGS] == "UT"
    assert 0.29 <= took < 0.8
    assert slow.hits == 1


def test_no_healthy_upstream_answers_503_uh_at_once() -> None:
    with upstreams(Upstream("only", "v1")) as (only,):
        mesh = mesh_of(
            service_entry("ratings"),  # no endpoints at all
            service_entry("reviews", only),
            destination_rule("reviews"),
            virtual_service("reviews", {"route": [to("reviews", "v3")]}),  # no endpoint is labelled v3
        )
        with running_sidecar(mesh) as sidecar, sidecar.client() as app:
            for url in ("http://ratings/", "http://reviews/"):
                started = time.monotonic()
                response = app.get(url)
                assert time.monotonic() - started < 0.5  # nothing waited for
                assert response.status_code == 503
                assert response.headers[FLAGS] == "UH"
    assert only.hits == 0
