"""Which TLS an attempt speaks, and which identity it expects: Istio's DestinationRule and auto-mTLS rules."""

from __future__ import annotations

from typing import Any

import pytest
from _upstreams import destination_rule, service_entry

import meshlib
from meshlib.engine import TLS_MODE_LABEL, Attempt, Proceed, RequestView


def entry(
    *, labelled: bool = True, service_account: str | None = None, sans: list[str] | None = None
) -> dict[str, Any]:
    doc = service_entry("reviews", ("127.0.0.1:9001", "v1"))
    ep = doc["spec"]["endpoints"][0]
    if labelled:
        ep["labels"][TLS_MODE_LABEL] = "istio"
    if service_account is not None:
        ep["serviceAccount"] = service_account
    if sans is not None:
        doc["spec"]["subjectAltNames"] = sans
    return doc


def first_attempt(*docs: dict[str, Any]) -> Attempt:
    mesh = meshlib.Mesh.from_resources(list(docs), workload="productpage", seed=1)
    plan = mesh.outbound.plan(RequestView.from_parts("GET", "http://reviews/", {}), 0.0)
    assert isinstance(plan, Proceed)
    step = plan.call.next_attempt(0.0)
    assert isinstance(step, Attempt)
    return step


def test_auto_mtls_for_endpoints_labelled_istio_expects_the_service_name_as_account() -> None:
    tls = first_attempt(entry()).tls
    assert tls is not None
    assert tls.mode == "ISTIO_MUTUAL"
    assert tls.auto
    assert tls.peer_ids == {"spiffe://cluster.local/ns/default/sa/reviews"}


def test_an_unlabelled_endpoint_gets_plaintext_without_a_destination_rule() -> None:
    assert first_attempt(entry(labelled=False)).tls is None


def test_the_endpoints_service_account_is_the_identity_expected() -> None:
    tls = first_attempt(entry(service_account="reviews-sa")).tls
    assert tls is not None
    assert tls.peer_ids == {"spiffe://cluster.local/ns/default/sa/reviews-sa"}


def test_service_entry_subject_alt_names_are_expected_when_no_account_is_given() -> None:
    sans = ["spiffe://cluster.local/ns/default/sa/a", "spiffe://cluster.local/ns/default/sa/b"]
    tls = first_attempt(entry(sans=sans)).tls
    assert tls is not None
    assert tls.peer_ids == set(sans)


def test_destination_rule_subject_alt_names_win() -> None:
    dr = destination_rule(
        "reviews", (), {"tls": {"mode": "ISTIO_MUTUAL", "subjectAltNames": ["spiffe://cluster.local/ns/x/sa/y"]}}
    )
    tls = first_attempt(entry(service_account="reviews-sa"), dr).tls
    assert tls is not None
    assert not tls.auto
    assert tls.peer_ids == {"spiffe://cluster.local/ns/x/sa/y"}


def test_destination_rule_disable_turns_auto_mtls_off() -> None:
    dr = destination_rule("reviews", (), {"tls": {"mode": "DISABLE"}})
    assert first_attempt(entry(), dr).tls is None


def test_destination_rule_istio_mutual_applies_to_unlabelled_endpoints() -> None:
    dr = destination_rule("reviews", (), {"tls": {"mode": "ISTIO_MUTUAL", "sni": "reviews.example"}})
    tls = first_attempt(entry(labelled=False), dr).tls
    assert tls is not None
    assert tls.mode == "ISTIO_MUTUAL"
    assert tls.sni == "reviews.example"


@pytest.mark.parametrize("mode", ["SIMPLE", "MUTUAL"])
def test_simple_and_mutual_carry_the_files_of_the_rule(mode: str) -> None:
    settings: dict[str, Any] = {"mode": mode, "caCertificates": "/etc/ca.pem", "subjectAltNames": ["reviews.example"]}
    if mode == "MUTUAL":
        settings |= {"clientCertificate": "/etc/c.pem", "privateKey": "/etc/k.pem"}
    tls = first_attempt(entry(), destination_rule("reviews", (), {"tls": settings})).tls
    assert tls is not None
    assert tls.mode == mode
    assert tls.ca_certificates == "/etc/ca.pem"
    assert tls.peer_ids == {"reviews.example"}
    assert (tls.client_certificate is not None) is (mode == "MUTUAL")


def test_the_trust_domain_of_the_mesh_config_names_the_expected_identity() -> None:
    mesh_config = {
        "apiVersion": "meshlib.io/v1alpha1",
        "kind": "MeshConfig",
        "metadata": {"name": "mesh", "namespace": "istio-system"},
        "spec": {"trustDomain": "prod.example"},
    }
    tls = first_attempt(entry(), mesh_config).tls
    assert tls is not None
    assert tls.peer_ids == {"spiffe://prod.example/ns/default/sa/reviews"}
