"""The router takes the route Istio would take, for the real corpus and for every match kind.

Engines are sans-IO: every test drives the router with a seeded ``random.Random`` and
plain :class:`RequestView` values, so shares are checked over many requests with
fixed results.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from _corpus import BOOKINFO_REGISTRY, CORPUS

from meshlib.engine._router import HeaderOps, RequestView, RouteDecision, Router, RouteTarget
from meshlib.policy import Snapshot

FQDN = "{}.default.svc.cluster.local"


def bookinfo(tmp_path: Path, *files: str) -> Router:
    if not CORPUS.is_dir():
        pytest.fail(f"the Istio corpus is missing at {CORPUS}")
    registry = tmp_path / "registry.yaml"
    registry.write_text(BOOKINFO_REGISTRY)
    return Router(Snapshot.from_files(registry, *(CORPUS / f for f in files)))


def get(url: str, headers: Mapping[str, str] | None = None, method: str = "GET") -> RequestView:
    return RequestView.from_parts(method, url, headers)


def subsets(router: Router, request: RequestView, n: int, seed: int = 7, **kw: Any) -> Counter[str | None]:
    rng = random.Random(seed)
    out: Counter[str | None] = Counter()
    for _ in range(n):
        decision = router.route(request, rng, **kw)
        assert decision is not None
        assert decision.destination is not None
        out[decision.destination.subset] += 1
    return out


def decide(router: Router, request: RequestView, seed: int = 1, **kw: Any) -> RouteDecision:
    decision = router.route(request, random.Random(seed), **kw)
    assert decision is not None
    return decision


# ---------------------------------------------------------------------------- YAML helpers


def service(*hosts: str, namespace: str = "default", versions: tuple[str, ...] = ("v1", "v2")) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": f"se-{hosts[0].replace('*', 'any').replace('.', '-')}", "namespace": namespace},
        "spec": {
            "hosts": list(hosts),
            "location": "MESH_INTERNAL",
            "resolution": "STATIC",
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
            "endpoints": [{"address": f"10.1.0.{i + 1}", "labels": {"version": v}} for i, v in enumerate(versions)],
        },
    }


def rule(host: str, *names: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": host.split(".")[0], "namespace": namespace},
        "spec": {"host": host, "subsets": [{"name": n, "labels": {"version": n}} for n in names]},
    }


def vs(host: str, *http: dict[str, Any], namespace: str = "default", name: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name or host.split(".")[0], "namespace": namespace},
        "spec": {"hosts": [host], "http": list(http)},
    }


def to(subset: str, weight: int | None = None, host: str = "web", **extra: Any) -> dict[str, Any]:
    dest: dict[str, Any] = {"destination": {"host": host, "subset": subset}, **extra}
    if weight is not None:
        dest["weight"] = weight
    return dest


def web(*http: dict[str, Any], versions: tuple[str, ...] = ("v1", "v2", "v3")) -> Router:
    """A router for host ``web`` with subsets v1..v3 and the given rules."""
    return Router(
        Snapshot.from_resources([service("web", versions=versions), rule("web", *versions), vs("web", *http)])
    )


def subset_of(router: Router, request: RequestView, **kw: Any) -> str | None:
    decision = decide(router, request, **kw)
    if decision.no_route:
        return "NR"
    assert decision.destination is not None
    return decision.destination.subset


# ---------------------------------------------------------------------------- the corpus


def test_reviews_80_20_splits_traffic_80_20(tmp_path: Path) -> None:
    router = bookinfo(tmp_path, "destination-rule-all.yaml", "virtual-service-reviews-80-20.yaml")
    counts = subsets(router, get("http://reviews:9080/reviews/0"), 5000)
    assert set(counts) == {"v1", "v2"}
    assert counts["v1"] / 5000 == pytest.approx(0.8, abs=0.02)
    assert counts["v2"] / 5000 == pytest.approx(0.2, abs=0.02)


def test_reviews_jason_goes_to_v2_and_everyone_else_to_v3(tmp_path: Path) -> None:
    router = bookinfo(tmp_path, "destination-rule-all.yaml", "virtual-service-reviews-jason-v2-v3.yaml")
    url = "http://reviews:9080/reviews/0"
    assert subsets(router, get(url, {"end-user": "jason"}), 200) == {"v2": 200}
    # header values match case-sensitively; header names do not
    assert subsets(router, get(url, {"End-User": "jason"}), 10) == {"v2": 10}
    for headers in ({"end-user": "Jason"}, {"end-user": "mary"}, {}, {"end-user": "jason-x"}):
        assert subsets(router, get(url, headers), 50) == {"v3": 50}, headers
    decision = decide(router, get(url, {"end-user": "jason"}))
    assert decision.destination == RouteTarget(FQDN.format("reviews"), "v2")
    assert decision.virtual_service == "VirtualService/default/reviews"
    assert decision.route_index == 0


def test_ratings_test_abort_aborts_every_request_of_jason_only(tmp_path: Path) -> None:
    router = bookinfo(tmp_path, "destination-rule-all.yaml", "virtual-service-ratings-test-abort.yaml")
    rng = random.Random(3)
    for _ in range(500):
        jason = router.route(get("http://ratings:9080/ratings/0", {"end-user": "jason"}), rng)
        assert jason is not None
        assert jason.fault_abort == 500
        assert jason.fault_injected
        assert jason.fault_delay is None
        other = router.route(get("http://ratings:9080/ratings/0", {"end-user": "mary"}), rng)
        assert other is not None
        assert other.fault_abort is None
        assert not other.fault_injected
        assert other.destination == RouteTarget(FQDN.format("ratings"), "v1")


def test_ratings_test_delay_delays_jason_7s_and_nobody_else(tmp_path: Path) -> None:
    router = bookinfo(tmp_path, "destination-rule-all.yaml", "virtual-service-ratings-test-delay.yaml")
    rng = random.Random(3)
    for _ in range(500):
        jason = router.route(get("http://ratings:9080/ratings/0", {"end-user": "jason"}), rng)
        assert jason is not None
        assert jason.fault_delay == 7.0
        assert jason.fault_abort is None
        assert jason.fault_injected
        assert jason.destination == RouteTarget(FQDN.format("ratings"), "v1")
        other = router.route(get("http://ratings:9080/ratings/0"), rng)
        assert other is not None
        assert other.fault_delay is None
        assert not other.fault_injected


def test_details_fault_file_aborts_everyone_with_555(tmp_path: Path) -> None:
    router = bookinfo(tmp_path, "fault-injection-details-v1.yaml")  # it carries its own DestinationRule
    rng = random.Random(5)
    for headers in ({}, {"end-user": "jason"}, {"x": "y"}):
        for _ in range(100):
            decision = router.route(get("http://details:9080/details/0", headers), rng)
            assert decision is not None
            assert decision.fault_abort == 555
            assert decision.route_index == 0


def test_all_v1_sends_every_service_to_v1_and_other_hosts_nowhere(tmp_path: Path) -> None:
    router = bookinfo(tmp_path, "destination-rule-all.yaml", "virtual-service-all-v1.yaml")
    for host in ("productpage", "reviews", "ratings", "details"):
        assert subsets(router, get(f"http://{host}:9080/"), 20) == {"v1": 20}
    assert router.route(get("http://httpbin.org/get"), random.Random(1)) is None


# ---------------------------------------------------------------------------- hosts


def test_short_name_fqdn_and_ports_route_the_same() -> None:
    router = web({"route": [to("v2")]})
    for authority in (
        "web",
        "web:80",
        "web:8080",
        "WEB",
        "web.default",
        "web.default.svc",
        "web.default.svc.cluster.local",
        "web.default.svc.cluster.local:80",
        "web.default.svc.cluster.local.",
    ):
        assert subset_of(router, get(f"http://{authority}/")) == "v2", authority


def test_short_names_resolve_in_the_callers_namespace() -> None:
    router = web({"route": [to("v2")]})
    assert router.route(get("http://web/"), random.Random(1), namespace="other") is None
    fqdn = decide(router, get("http://web.default.svc.cluster.local/"), namespace="other")
    assert fqdn.destination is not None
    assert fqdn.destination.subset == "v2"


def test_virtual_service_short_names_resolve_in_its_own_namespace() -> None:
    snapshot = Snapshot.from_resources(
        [
            service("api", namespace="shop"),
            rule("api", "v1", "v2", namespace="shop"),
            vs("api", {"route": [to("v1", host="api")], "mirror": {"host": "api", "subset": "v2"}}, namespace="shop"),
        ]
    )
    decision = decide(Router(snapshot), get("http://api/"), namespace="shop")
    assert decision.destination == RouteTarget("api.shop.svc.cluster.local", "v1")
    assert decision.mirrors == (RouteTarget("api.shop.svc.cluster.local", "v2"),)


def test_an_unknown_host_is_not_routed() -> None:
    router = web({"route": [to("v1")]})
    assert router.route(get("http://example.com/"), random.Random(1)) is None
    assert router.route(get("http://other/"), random.Random(1)) is None
    assert router.route(RequestView("GET", "http", "", "/"), random.Random(1)) is None


def test_a_known_host_without_virtual_service_goes_to_itself() -> None:
    snapshot = Snapshot.from_resources([service("web"), rule("payments", "v1"), service("api.example.com")])
    router = Router(snapshot)
    for authority, host in (
        ("web", FQDN.format("web")),
        ("payments:8443", FQDN.format("payments")),
        ("api.example.com", "api.example.com"),
    ):
        decision = decide(router, get(f"http://{authority}/x"))
        assert decision == RouteDecision(RouteTarget(host))
        assert decision.virtual_service is None
        assert decision.retries is None
        assert decision.timeout is None
        assert not decision.no_route
        assert not decision.fault_injected


def test_wildcard_hosts_cover_their_subdomains() -> None:
    snapshot = Snapshot.from_resources(
        [
            service("*.wikipedia.org"),
            service("*.example.com"),
            vs("*.example.com", {"route": [{"destination": {"host": "edge.example.com"}}]}, name="edge"),
            service("edge.example.com"),
        ]
    )
    router = Router(snapshot)
    wiki = decide(router, get("https://en.wikipedia.org/wiki"))
    assert wiki.destination == RouteTarget("en.wikipedia.org")
    assert wiki.virtual_service is None
    for host in ("api.example.com", "a.b.example.com", "edge.example.com"):
        routed = decide(router, get(f"http://{host}/"))
        assert routed.destination == RouteTarget("edge.example.com"), host
        assert routed.virtual_service == "VirtualService/default/edge"
    assert router.route(get("http://example.com/"), random.Random(1)) is None


# ---------------------------------------------------------------------------- matching


def test_first_matching_rule_wins() -> None:
    router = web(
        {"match": [{"uri": {"prefix": "/api"}}], "route": [to("v1")]},
        {"match": [{"uri": {"prefix": "/api/v2"}}], "route": [to("v2")]},
        {"route": [to("v3")]},
    )
    assert subset_of(router, get("http://web/api/v2/items")) == "v1"
    assert subset_of(router, get("http://web/other")) == "v3"


def test_conditions_and_within_a_match_entry_and_entries_or() -> None:
    router = web(
        {
            "name": "both",
            "match": [
                {"name": "beta", "uri": {"prefix": "/api"}, "headers": {"x-beta": {"exact": "1"}}},
                {"name": "admin", "method": {"exact": "DELETE"}},
            ],
            "route": [to("v2")],
        },
        {"route": [to("v1")]},
    )
    assert subset_of(router, get("http://web/api/x", {"x-beta": "1"})) == "v2"
    assert subset_of(router, get("http://web/api/x")) == "v1"  # one condition of the entry fails
    assert subset_of(router, get("http://web/other", {"x-beta": "1"})) == "v1"
    assert subset_of(router, get("http://web/other", method="DELETE")) == "v2"  # the other entry
    assert decide(router, get("http://web/other", method="DELETE")).route_name == "both.admin"
    assert decide(router, get("http://web/api", {"x-beta": "1"})).route_name == "both.beta"


@pytest.mark.parametrize(
    ("match", "hits", "misses"),
    [
        ({"uri": {"exact": "/a"}}, ["/a"], ["/a/", "/ab", "/A"]),
        ({"uri": {"prefix": "/a"}}, ["/a", "/ab", "/a/b"], ["/b", "/A"]),
        ({"uri": {"regex": "/items/[0-9]+"}}, ["/items/1", "/items/42"], ["/items/x", "/items/1/x", "/x/items/1"]),
        ({"uri": {"exact": "/Login"}, "ignoreUriCase": True}, ["/login", "/LOGIN", "/Login"], ["/login/x"]),
        ({"uri": {"prefix": "/Api"}, "ignoreUriCase": True}, ["/api/x", "/API"], ["/ap"]),
        # Envoy ignores case_sensitive for regex routes
        ({"uri": {"regex": "/abc"}, "ignoreUriCase": True}, ["/abc"], ["/ABC"]),
    ],
)
def test_uri_matches(match: dict[str, Any], hits: list[str], misses: list[str]) -> None:
    router = web({"match": [match], "route": [to("v2")]}, {"route": [to("v1")]})
    for path in hits:
        assert subset_of(router, get(f"http://web{path}?q=1")) == "v2", path
    for path in misses:
        assert subset_of(router, get(f"http://web{path}")) == "v1", path


def test_header_matches_exact_prefix_regex_and_presence() -> None:
    router = web(
        {"match": [{"headers": {"x-exact": {"exact": "a"}}}], "route": [to("v1")]},
        {"match": [{"headers": {"x-prefix": {"prefix": "ab"}}}], "route": [to("v1")]},
        {"match": [{"headers": {"x-regex": {"regex": "[0-9]{3}"}}}], "route": [to("v1")]},
        {"match": [{"headers": {"x-present": {}}}], "route": [to("v1")]},
    )
    assert subset_of(router, get("http://web/", {"x-exact": "a"})) == "v1"
    assert subset_of(router, get("http://web/", {"x-exact": "ab"})) == "NR"
    assert subset_of(router, get("http://web/", {"x-prefix": "abc"})) == "v1"
    assert subset_of(router, get("http://web/", {"x-prefix": "a"})) == "NR"
    assert subset_of(router, get("http://web/", {"x-regex": "123"})) == "v1"
    assert subset_of(router, get("http://web/", {"x-regex": "1234"})) == "NR"
    assert subset_of(router, get("http://web/", {"x-present": ""})) == "v1"
    assert subset_of(router, get("http://web/")) == "NR"
    # repeated headers are matched joined with ","
    joined = RequestView.from_parts("GET", "http://web/", [("X-Exact", "a"), ("x-exact", "b")])
    assert joined.headers["x-exact"] == "a,b"
    assert subset_of(router, joined) == "NR"


def test_without_headers_negates_and_a_missing_header_counts_as_empty() -> None:
    router = web(
        {"match": [{"withoutHeaders": {"x-canary": {"exact": "1"}}}], "route": [to("v1")]},
        {"route": [to("v2")]},
    )
    assert subset_of(router, get("http://web/")) == "v1"
    assert subset_of(router, get("http://web/", {"x-canary": "0"})) == "v1"
    assert subset_of(router, get("http://web/", {"x-canary": "1"})) == "v2"
    present = web({"match": [{"withoutHeaders": {"x-debug": {}}}], "route": [to("v1")]}, {"route": [to("v2")]})
    assert subset_of(present, get("http://web/")) == "v1"
    assert subset_of(present, get("http://web/", {"x-debug": ""})) == "v2"


def test_query_param_matches() -> None:
    router = web(
        {"match": [{"queryParams": {"user": {"exact": "jane doe"}}}], "route": [to("v1")]},
        {"match": [{"queryParams": {"debug": {}}}], "route": [to("v2")]},
        {"match": [{"queryParams": {"page": {"regex": "[0-9]+"}}}], "route": [to("v3")]},
    )
    assert subset_of(router, get("http://web/?user=jane%20doe")) == "v1"
    assert subset_of(router, get("http://web/?user=jane%20doe&user=x")) == "v1"  # the first value counts
    assert subset_of(router, get("http://web/?user=x&user=jane%20doe")) == "NR"
    assert subset_of(router, get("http://web/?debug")) == "v2"
    assert subset_of(router, get("http://web/?debug=")) == "v2"
    assert subset_of(router, get("http://web/?page=12")) == "v3"
    assert subset_of(router, get("http://web/?page=1a")) == "NR"
    assert subset_of(router, get("http://web/search?user")) == "NR"  # present but empty is not "jane doe"
    assert get("http://web/?a=1&b=%2F&a=2").query_params == {"a": "1", "b": "/"}


def test_method_scheme_and_authority_matches() -> None:
    router = web(
        {"match": [{"method": {"regex": "POST|PUT"}}], "route": [to("v1")]},
        {"match": [{"scheme": {"exact": "https"}}], "route": [to("v2")]},
        {"match": [{"authority": {"prefix": "web.default"}}], "route": [to("v3")]},
    )
    assert subset_of(router, get("http://web/", method="PUT")) == "v1"
    assert subset_of(router, get("https://web/")) == "v2"
    assert subset_of(router, get("http://web.default.svc.cluster.local/")) == "v3"
    assert subset_of(router, get("http://web/")) == "NR"


def test_port_matches_the_authority_port_or_the_scheme_default() -> None:
    router = web(
        {"match": [{"port": 8080}], "route": [to("v1")]},
        {"match": [{"port": 443}], "route": [to("v2")]},
        {"match": [{"port": 80}], "route": [to("v3")]},
    )
    assert subset_of(router, get("http://web:8080/")) == "v1"
    assert subset_of(router, get("https://web/")) == "v2"
    assert subset_of(router, get("http://web/")) == "v3"
    assert subset_of(router, get("http://web:443/")) == "v2"
    assert subset_of(router, get("http://web:9090/")) == "NR"


def test_source_labels_select_which_callers_a_rule_applies_to() -> None:
    router = web(
        {"match": [{"sourceLabels": {"app": "checkout", "version": "v2"}}], "route": [to("v2")]},
        {"route": [to("v1")]},
    )
    request = get("http://web/")
    assert subset_of(router, request, source_labels={"app": "checkout", "version": "v2", "team": "x"}) == "v2"
    assert subset_of(router, request, source_labels={"app": "checkout", "version": "v1"}) == "v1"
    assert subset_of(router, request, source_labels={}) == "v1"
    assert subset_of(router, request) == "v1"


def test_no_matching_rule_is_a_no_route_decision() -> None:
    router = web({"match": [{"uri": {"prefix": "/api"}}], "route": [to("v1")]})
    decision = decide(router, get("http://web/other"))
    assert decision.no_route
    assert decision.destination is None
    assert decision.virtual_service == "VirtualService/default/web"
    assert not decide(router, get("http://web/api")).no_route


# ---------------------------------------------------------------------------- weights


def test_weight_zero_gets_nothing_and_weight_100_everything() -> None:
    router = web({"route": [to("v1", 0), to("v2", 100)]})
    assert subsets(router, get("http://web/"), 2000) == {"v2": 2000}
    router = web({"route": [to("v1", 100), to("v2", 0), to("v3", 0)]})
    assert subsets(router, get("http://web/"), 2000) == {"v1": 2000}


def test_a_lone_destination_takes_all_traffic_whatever_its_weight() -> None:
    router = web({"route": [to("v3", 10)]})
    assert subsets(router, get("http://web/"), 500) == {"v3": 500}


def test_canary_95_5_splits_within_tolerance() -> None:
    router = web({"route": [to("v1", 95), to("v2", 5)]})
    counts = subsets(router, get("http://web/"), 10_000, seed=11)
    assert counts["v2"] / 10_000 == pytest.approx(0.05, abs=0.01)
    assert counts["v1"] + counts["v2"] == 10_000


def test_three_way_relative_weights() -> None:
    router = web({"route": [to("v1", 1), to("v2", 1), to("v3", 2)]})
    counts = subsets(router, get("http://web/"), 8000, seed=2)
    assert counts["v1"] / 8000 == pytest.approx(0.25, abs=0.02)
    assert counts["v3"] / 8000 == pytest.approx(0.5, abs=0.02)


def test_the_same_seed_replays_the_same_choices() -> None:
    router = web({"route": [to("v1", 50), to("v2", 50)]})
    request = get("http://web/")
    first = [subset_of(router, request, seed=s) for s in range(50)]
    assert first == [subset_of(router, request, seed=s) for s in range(50)]
    assert set(first) == {"v1", "v2"}


def test_blue_green_flips_with_the_snapshot() -> None:
    blue = web({"route": [to("v1", 100), to("v2", 0)]})
    green = web({"route": [to("v1", 0), to("v2", 100)]})
    assert blue.version != green.version
    request = get("http://web/")
    assert subsets(blue, request, 300) == {"v1": 300}
    assert subsets(green, request, 300) == {"v2": 300}


# ---------------------------------------------------------------------------- rewrites, headers, local answers


def test_uri_prefix_rewrite_replaces_what_the_path_match_matched() -> None:
    router = web(
        {"match": [{"uri": {"prefix": "/old/"}}], "rewrite": {"uri": "/new/"}, "route": [to("v1")]},
        {"match": [{"uri": {"exact": "/login"}}], "rewrite": {"uri": "/auth/login"}, "route": [to("v1")]},
        {"match": [{"uri": {"regex": "/r/.*"}}], "rewrite": {"uri": "/flat"}, "route": [to("v1")]},
        {"match": [{"uri": {"prefix": "/API"}, "ignoreUriCase": True}], "rewrite": {"uri": "/v2"}, "route": [to("v1")]},
        # no uri match: Istio matches on prefix "/", so that "/" is what gets replaced
        {"match": [{"headers": {"x-v": {"exact": "2"}}}], "rewrite": {"uri": "/v2/"}, "route": [to("v1")]},
        {"route": [to("v1")]},
    )
    cases = {
        "/old/a/b": "/new/a/b",
        "/login": "/auth/login",
        "/r/x/y": "/flat",
        "/api/items": "/v2/items",
    }
    for path, rewritten in cases.items():
        assert decide(router, get(f"http://web{path}?q=1")).rewrite_path == rewritten, path
    assert decide(router, get("http://web/items", {"x-v": "2"})).rewrite_path == "/v2/items"
    assert decide(router, get("http://web/untouched")).rewrite_path is None


def test_uri_regex_rewrite_and_authority_rewrite() -> None:
    router = web(
        {
            "match": [{"uri": {"prefix": "/service/"}}],
            "rewrite": {"uriRegexRewrite": {"match": "^/service/([^/]+)(/.*)$", "rewrite": "\\2/instance/\\1"}},
            "route": [to("v1")],
        },
        {"rewrite": {"authority": "backend.internal"}, "route": [to("v2")]},
    )
    decision = decide(router, get("http://web/service/foo/v1/api"))
    assert decision.rewrite_path == "/v1/api/instance/foo"
    assert decision.rewrite_authority is None
    other = decide(router, get("http://web/x"))
    assert other.rewrite_authority == "backend.internal"
    assert other.rewrite_path is None


def test_header_operations_compose_route_and_destination() -> None:
    router = web(
        {
            "headers": {
                "request": {
                    "set": {"x-route": "r", "x-both": "route"},
                    "add": {"x-trace": "1"},
                    "remove": ["x-secret"],
                },
                "response": {"remove": ["server"]},
            },
            "route": [
                to("v1", 50, headers={"request": {"set": {"x-both": "dest", "host": "v1.web"}}}),
                to("v2", 50),
            ],
        }
    )
    seen = {}
    rng = random.Random(4)
    for _ in range(50):
        decision = router.route(get("http://web/"), rng)
        assert decision is not None
        assert decision.destination is not None
        seen[decision.destination.subset] = decision
    # weighted destinations apply before the route: the route's set wins
    v1 = seen["v1"].request_headers
    assert dict(v1.set) == {"x-both": "route", "x-route": "r"}
    assert v1.add == (("x-trace", "1"),)
    assert v1.remove == ("x-secret",)
    assert seen["v1"].rewrite_authority == "v1.web"
    assert seen["v2"].rewrite_authority is None
    assert seen["v1"].response_headers.remove == ("server",)
    applied = v1.apply([("X-Secret", "s"), ("x-both", "client"), ("accept", "*/*")])
    assert sorted(applied) == [("accept", "*/*"), ("x-both", "route"), ("x-route", "r"), ("x-trace", "1")]
    # a lone destination shares the route's list: its set comes last and wins
    lone = web({"headers": {"request": {"set": {"x-both": "route"}}}, "route": [to("v1", headers=_set("x-both", "d"))]})
    assert dict(decide(lone, get("http://web/")).request_headers.set) == {"x-both": "d"}


def _set(name: str, value: str) -> dict[str, Any]:
    return {"request": {"set": {name: value}}}


def test_header_ops_then_is_sequential_application() -> None:
    first = HeaderOps(set=(("a", "1"),), add=(("b", "1"),))
    later = HeaderOps(remove=("b",), add=(("a", "2"),))
    combined = first.then(later)
    headers = [("b", "0"), ("c", "0")]
    assert sorted(combined.apply(headers)) == sorted(later.apply(first.apply(headers)))
    assert sorted(combined.apply(headers)) == [("a", "1"), ("a", "2"), ("c", "0")]


def test_redirect_and_direct_response() -> None:
    router = web(
        {"match": [{"uri": {"prefix": "/old"}}], "redirect": {"uri": "/new", "authority": "web.example.com"}},
        {"match": [{"uri": {"prefix": "/secure"}}], "redirect": {"scheme": "https", "redirectCode": 308}},
        {"match": [{"uri": {"prefix": "/health"}}], "directResponse": {"status": 200, "body": {"string": "ok"}}},
        {"route": [to("v1")]},
    )
    moved = decide(router, get("http://web/old/page?x=1"))
    assert moved.redirect is not None
    assert moved.destination is None
    assert (moved.redirect.status, moved.redirect.location) == (301, "http://web.example.com/new?x=1")
    secure = decide(router, get("http://web:80/secure/a"))
    assert secure.redirect is not None
    assert (secure.redirect.status, secure.redirect.location) == (308, "https://web/secure/a")
    health = decide(router, get("http://web/health"))
    assert health.direct_response is not None
    assert health.destination is None
    assert (health.direct_response.status, health.direct_response.body) == (200, b"ok")


# ---------------------------------------------------------------------------- policy carried, faults, mirrors


def test_retries_and_timeout_are_carried_through() -> None:
    router = web(
        {
            "match": [{"uri": {"prefix": "/slow"}}],
            "timeout": "1.5s",
            "retries": {"attempts": 3, "perTryTimeout": "500ms", "retryOn": "5xx,reset"},
            "route": [to("v1")],
        },
        {"match": [{"uri": {"prefix": "/off"}}], "timeout": "0s", "retries": {"attempts": 0}, "route": [to("v1")]},
        {"route": [to("v2")]},
    )
    slow = decide(router, get("http://web/slow"))
    assert slow.timeout == 1.5
    assert slow.retries is not None
    assert (slow.retries.attempts, slow.retries.per_try_timeout, slow.retries.retry_on) == (3, 0.5, "5xx,reset")
    off = decide(router, get("http://web/off"))
    assert off.timeout == 0.0
    assert off.retries is not None
    assert off.retries.attempts == 0
    default = decide(router, get("http://web/"))
    assert default.timeout is None
    assert default.retries is None


def test_fault_percentage_50_hits_about_half_and_delay_and_abort_draw_apart() -> None:
    router = web(
        {
            "fault": {
                "delay": {"fixedDelay": "2s", "percentage": {"value": 50}},
                "abort": {"httpStatus": 503, "percentage": {"value": 50}},
            },
            "timeout": "1s",
            "route": [to("v1")],
        }
    )
    rng = random.Random(9)
    n = 4000
    decisions = [router.route(get("http://web/"), rng) for _ in range(n)]
    delays = sum(1 for d in decisions if d is not None and d.fault_delay == 2.0)
    aborts = sum(1 for d in decisions if d is not None and d.fault_abort == 503)
    both = sum(1 for d in decisions if d is not None and d.fault_delay and d.fault_abort)
    assert delays / n == pytest.approx(0.5, abs=0.03)
    assert aborts / n == pytest.approx(0.5, abs=0.03)
    assert both / n == pytest.approx(0.25, abs=0.03)
    injected = [d for d in decisions if d is not None and d.fault_injected]
    assert len(injected) == sum(1 for d in decisions if d is not None and (d.fault_delay or d.fault_abort))
    assert all(d is not None and d.timeout == 1.0 for d in decisions)  # carried; fault_injected tells to skip it


def test_fault_without_percentage_affects_no_request() -> None:
    router = web({"fault": {"abort": {"httpStatus": 500}}, "route": [to("v1")]})
    assert all(not decide(router, get("http://web/"), seed=s).fault_injected for s in range(200))


@pytest.mark.parametrize(("percent", "expected"), [(0, 0.0), (50, 0.5), (100, 1.0)])
def test_mirror_percentage(percent: int, expected: float) -> None:
    router = web(
        {"route": [to("v1")], "mirror": {"host": "web", "subset": "v2"}, "mirrorPercentage": {"value": percent}}
    )
    rng = random.Random(21)
    n = 4000
    mirrored = 0
    for _ in range(n):
        decision = router.route(get("http://web/"), rng)
        assert decision is not None
        assert decision.destination == RouteTarget(FQDN.format("web"), "v1")
        if decision.mirrors:
            assert decision.mirrors == (RouteTarget(FQDN.format("web"), "v2"),)
            mirrored += 1
    assert mirrored / n == pytest.approx(expected, abs=0.03)


def test_mirrors_list_draws_each_target_and_defaults_to_all() -> None:
    snapshot = Snapshot.from_resources(
        [
            service("web"),
            rule("web", "v1", "v2"),
            service("audit"),
            vs(
                "web",
                {
                    "route": [to("v1")],
                    "mirrors": [
                        {"destination": {"host": "audit"}},
                        {
                            "destination": {"host": "web", "subset": "v2", "port": {"number": 80}},
                            "percentage": {"value": 25},
                        },
                    ],
                },
            ),
        ]
    )
    router = Router(snapshot)
    rng = random.Random(8)
    counts: Counter[RouteTarget] = Counter()
    for _ in range(4000):
        decision = router.route(get("http://web/"), rng)
        assert decision is not None
        counts.update(decision.mirrors)
    assert counts[RouteTarget(FQDN.format("audit"))] == 4000
    assert counts[RouteTarget(FQDN.format("web"), "v2", 80)] / 4000 == pytest.approx(0.25, abs=0.03)


def test_static_decisions_are_compiled_once_and_shared() -> None:
    router = web({"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [to("v2")]}, {"route": [to("v3")]})
    request = get("http://web/", {"end-user": "jason"})
    assert router.route(request, random.Random(1)) is router.route(request, random.Random(2))


def test_request_view_from_parts() -> None:
    view = RequestView.from_parts("GET", "/a/b?x=1&y=%41", {"Host": "web:8080", "X-A": "1"})
    assert (view.scheme, view.authority, view.path, view.query) == ("http", "web:8080", "/a/b", "x=1&y=%41")
    assert view.headers == {"host": "web:8080", "x-a": "1"}
    assert view.query_params == {"x": "1", "y": "A"}
    assert view.port == 8080
    bare = RequestView.from_parts("POST", "https://web")
    assert (bare.path, bare.query, bare.port) == ("/", "", 443)
