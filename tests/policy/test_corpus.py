"""The real Istio corpus (../shared/corpus/istio) loads and means what it means in Istio.

Each file is loaded as Istio would apply it, with the subsets of
destination-rule-all.yaml and a ServiceEntry of our own that says which endpoint
carries which ``version`` label (the corpus does not say).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _corpus import BOOKINFO_REGISTRY

from meshlib.policy import Snapshot, Workload, validate_paths


def bookinfo(corpus: Path, tmp_path: Path, *files: str) -> Snapshot:
    registry = tmp_path / "registry.yaml"
    registry.write_text(BOOKINFO_REGISTRY)
    return Snapshot.from_files(registry, *(corpus / f for f in files))


def test_the_corpus_folder_validates_without_errors(corpus: Path) -> None:
    issues = validate_paths([corpus])
    assert [i for i in issues if i.severity == "error"] == []
    # the bookinfo files are alternatives (three VirtualServices for ratings): named, not hidden
    assert any("as one mesh these files conflict" in i.message for i in issues)


def test_a_route_file_alone_names_its_missing_subsets(corpus: Path) -> None:
    issues = validate_paths([corpus / "virtual-service-reviews-80-20.yaml"])
    assert {i.field for i in issues if i.severity == "error"} == {
        "spec.http[0].route[0].destination.subset",
        "spec.http[0].route[1].destination.subset",
    }
    assert validate_paths([corpus / "destination-rule-all.yaml", corpus / "virtual-service-reviews-80-20.yaml"]) == []


def test_every_corpus_file_loads_as_a_mesh_with_its_subsets(corpus: Path, tmp_path: Path) -> None:
    for path in sorted(corpus.glob("*.yaml")):
        if path.name in ("destination-rule-all.yaml", "fault-injection-details-v1.yaml"):
            snap = bookinfo(corpus, tmp_path, path.name)  # they carry their own rules
        else:
            snap = bookinfo(corpus, tmp_path, "destination-rule-all.yaml", path.name)
        assert snap.resources, path.name


def test_subsets_select_endpoints_by_version_label(corpus: Path, tmp_path: Path) -> None:
    snap = bookinfo(corpus, tmp_path, "destination-rule-all.yaml")
    for version, address in (("v1", "10.0.0.1"), ("v2", "10.0.0.2"), ("v3", "10.0.0.3")):
        assert [e.address for e in snap.subset("reviews", version).endpoints] == [address]
    assert snap.subset("ratings", "v2-mysql").endpoints == ()  # no endpoint carries that label


def test_reviews_80_20_splits_by_weight(corpus: Path, tmp_path: Path) -> None:
    snap = bookinfo(corpus, tmp_path, "destination-rule-all.yaml", "virtual-service-reviews-80-20.yaml")
    vs = snap.virtual_service("reviews.default.svc.cluster.local")
    assert vs is not None
    (route,) = vs.spec.http
    assert [d.destination.subset for d in route.route] == ["v1", "v2"]
    assert route.destination_weights == (80, 20)


def test_all_v1_sends_every_service_to_v1(corpus: Path, tmp_path: Path) -> None:
    snap = bookinfo(corpus, tmp_path, "destination-rule-all.yaml", "virtual-service-all-v1.yaml")
    for host in ("productpage", "reviews", "ratings", "details"):
        vs = snap.virtual_service(host)
        assert vs is not None
        (route,) = vs.spec.http
        assert [(d.destination.subset, w) for d, w in zip(route.route, route.destination_weights, strict=True)] == [
            ("v1", 100)
        ]


def test_jason_goes_to_v2_and_everyone_else_to_v3(corpus: Path, tmp_path: Path) -> None:
    snap = bookinfo(corpus, tmp_path, "destination-rule-all.yaml", "virtual-service-reviews-jason-v2-v3.yaml")
    vs = snap.virtual_service("reviews")
    assert vs is not None
    first, fallback = vs.spec.http
    (match,) = first.match or ()
    assert set(match.headers) == {"end-user"}
    assert match.headers["end-user"].matches("jason")
    assert not match.headers["end-user"].matches("Jason")  # Istio's exact match is case-sensitive
    assert not match.headers["end-user"].matches(None)
    assert [d.destination.subset for d in first.route] == ["v2"]
    assert not fallback.match
    assert [d.destination.subset for d in fallback.route] == ["v3"]


@pytest.mark.parametrize(
    ("name", "delay", "abort"),
    [("virtual-service-ratings-test-delay.yaml", 7.0, None), ("virtual-service-ratings-test-abort.yaml", None, 500)],
)
def test_ratings_faults_apply_to_jason_only_with_the_old_percent_field(
    corpus: Path, tmp_path: Path, name: str, delay: float | None, abort: int | None
) -> None:
    snap = bookinfo(corpus, tmp_path, "destination-rule-all.yaml", name)
    vs = snap.virtual_service("ratings")
    assert vs is not None
    jason, others = vs.spec.http
    assert jason.match is not None
    assert jason.match[0].headers["end-user"].exact == "jason"
    fault = jason.fault
    assert fault is not None
    if delay is not None:
        assert fault.delay is not None
        assert fault.delay.fixed_delay == delay
        assert fault.delay.effective_fraction == 1.0  # `percent: 100`, the old integer field
        assert fault.abort is None
    if abort is not None:
        assert fault.abort is not None
        assert fault.abort.http_status == abort
        assert fault.abort.effective_fraction == 1.0
        assert fault.delay is None
    assert others.fault is None
    assert [d.destination.subset for d in others.route] == ["v1"]


def test_details_fault_aborts_every_request_with_555(corpus: Path, tmp_path: Path) -> None:
    snap = bookinfo(corpus, tmp_path, "fault-injection-details-v1.yaml")
    vs = snap.virtual_service("details")
    assert vs is not None
    faulted, _ = vs.spec.http
    assert not faulted.match  # the first route takes every request
    assert faulted.fault is not None
    assert faulted.fault.abort is not None
    assert faulted.fault.abort.http_status == 555
    assert faulted.fault.abort.effective_fraction == 1.0


def test_authz_deny_and_allow_apply_to_every_workload_of_their_namespace(corpus: Path) -> None:
    snap = Snapshot.from_files(corpus / "authz-deny-and-allow.yaml")
    policies = snap.authorization_policies(Workload("httpbin", namespace="foo"))
    assert {(p.name, p.spec.action) for p in policies} == {("httpbin-deny", "DENY"), ("httpbin-allow", "ALLOW")}
    (deny,) = [p for p in policies if p.spec.action == "DENY"]
    assert deny.spec.rules is not None
    assert deny.spec.rules[0].from_ is not None
    assert deny.spec.rules[0].from_[0].source.principals == ["deny"]
    # a workload of another namespace is not governed by them
    assert snap.authorization_policies(Workload("httpbin", namespace="bar")) == ()


def test_authz_full_rule_selects_by_labels(corpus: Path) -> None:
    snap = Snapshot.from_files(corpus / "authz-allow-full-rule.yaml")
    v1 = Workload("httpbin", namespace="foo", labels={"app": "httpbin", "version": "v1"})
    v2 = Workload("httpbin", namespace="foo", labels={"app": "httpbin", "version": "v2"})
    assert [p.name for p in snap.authorization_policies(v1)] == ["httpbin-1"]
    assert snap.authorization_policies(v2) == ()
    (policy,) = snap.authorization_policies(v1)
    assert policy.spec.action == "ALLOW"
    assert policy.spec.rules is not None
    assert len(policy.spec.rules) == 2
    # the JWT fields are accepted and named as not enforced, never silently dropped
    fields = {w.field for w in snap.warnings}
    assert "spec.rules[1].from[0].source.requestPrincipals" in fields


def test_per_port_mtls_is_strict_on_8090_only(corpus: Path) -> None:
    snap = Snapshot.from_files(corpus / "peer-authentication-per-port.yaml")
    b = snap.mtls(Workload("b", labels={"app": "b"}))
    assert b.mode == "DISABLE"
    assert b.mode_for(8090) == "STRICT"
    assert b.mode_for(80) == "DISABLE"
    assert snap.mtls(Workload("c")).mode == "PERMISSIVE"  # not selected: Istio's default
    # and the `*.local` DestinationRule turns client TLS off for every .local host
    rule = snap.destination_rule("reviews.default.svc.cluster.local")
    assert rule is not None
    assert rule.spec.traffic_policy is not None
    assert rule.spec.traffic_policy.tls is not None
    assert rule.spec.traffic_policy.tls.mode == "DISABLE"
    assert snap.destination_rule("api.example.com") is None
