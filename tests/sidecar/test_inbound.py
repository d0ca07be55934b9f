"""The inbound listener between two sidecars: mTLS identities, authorization, limits, PeerAuthentication.

App A calls ``http://reviews/`` through A's outbound sidecar; A's mesh sends it over mTLS
(workload certificates from one ``CertificateAuthority``) to B's inbound sidecar, which
runs ``MeshMiddleware`` and forwards to app B with ``x-forwarded-client-cert``. The same
expectations as ``tests/server/test_middleware*.py`` and ``tests/client/test_mtls.py``,
with nothing in either app but plain HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.server._xfcc import peer_from_xfcc
from tests._upstreams import serving
from tests.sidecar._sidecar import (
    CLIENT_ID,
    SERVER,
    SERVER_ID,
    RecordingApp,
    peer_authentication,
    running_sidecar,
    sidecar_pair,
)

FORGED = "spiffe://cluster.local/ns/default/sa/admin"
DENIED = "RBAC: access denied"


@pytest.fixture(scope="module")
def ca() -> meshlib.CertificateAuthority:
    return meshlib.CertificateAuthority.create()


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with meshlib.set_testing(True):
        yield


def authorization(action: str, principals: list[str], name: str = "reviews-authz") -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "reviews"}},
            "action": action,
            "rules": [{"from": [{"source": {"principals": principals}}]}],
        },
    }


def rate_limit(rate: str) -> dict[str, Any]:
    return {
        "apiVersion": "meshlib.io/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": "reviews-limits", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "reviews"}}, "limits": [{"name": "all", "rate": rate}]},
    }


def test_a_request_crosses_two_sidecars_over_mtls_and_app_b_sees_a_s_identity(
    ca: meshlib.CertificateAuthority,
) -> None:
    with sidecar_pair(ca, [peer_authentication("STRICT")]) as pair, pair.client() as app_a:
        responses = [app_a.get("http://reviews/items?x=1") for _ in range(3)]
        clusters = pair.a.admin("/clusters").json()["clusters"]
    assert [r.status_code for r in responses] == [200] * 3
    assert [r.json()["app"] for r in responses] == ["reviews"] * 3
    received = pair.app.requests[-1]
    assert (received.path, received.query) == ("/items", "x=1")
    xfcc = received.header("x-forwarded-client-cert")
    assert xfcc is not None
    assert xfcc.startswith(f"By={SERVER_ID};Hash=")  # Envoy's form: B's own id, the cert's hash, A's id
    assert str(peer_from_xfcc(xfcc)) == CLIENT_ID
    assert xfcc.endswith(f"URI={CLIENT_ID}")
    assert received.header("x-forwarded-proto") == "https"
    assert received.header("x-forwarded-for") == "127.0.0.1"
    (reviews,) = clusters
    assert [e["tls"] for e in reviews["endpoints"]] == [True]  # A originated mTLS to B's inbound port


def test_authorization_policy_on_b_denies_a_s_principal(ca: meshlib.CertificateAuthority) -> None:
    deny = authorization("DENY", [CLIENT_ID.removeprefix("spiffe://")])
    with sidecar_pair(ca, [peer_authentication("STRICT"), deny]) as pair, pair.client() as app_a:
        response = app_a.get("http://reviews/")
    assert response.status_code == 403
    assert response.text == DENIED
    assert pair.app.requests == []  # refused at B's sidecar: app B never saw it


def test_authorization_policy_allowing_a_s_principal_lets_it_in(ca: meshlib.CertificateAuthority) -> None:
    allow = authorization("ALLOW", [CLIENT_ID.removeprefix("spiffe://")])
    with sidecar_pair(ca, [peer_authentication("STRICT"), allow]) as pair, pair.client() as app_a:
        assert app_a.get("http://reviews/").status_code == 200


def test_server_side_rate_limit_on_b_answers_429(ca: meshlib.CertificateAuthority) -> None:
    with sidecar_pair(ca, [rate_limit("3/minute")]) as pair, pair.client() as app_a:
        statuses = [app_a.get("http://reviews/").status_code for _ in range(3)]
        refused = app_a.get("http://reviews/")
    assert statuses == [200, 200, 200]
    assert refused.status_code == 429
    assert refused.headers["x-ratelimit-limit"] == "3;w=60"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert len(pair.app.requests) == 3


def test_strict_refuses_a_plaintext_client_at_b_s_inbound_port(ca: meshlib.CertificateAuthority) -> None:
    with sidecar_pair(ca, [peer_authentication("STRICT")]) as pair:
        response = httpx.get(f"{pair.b.inbound_url}/", timeout=5)
        with pair.client() as app_a:
            assert app_a.get("http://reviews/").status_code == 200  # the mesh caller still gets in
    assert response.status_code == 400
    assert "requires mutual TLS" in response.text
    assert len(pair.app.requests) == 1


def test_a_forged_client_cert_header_sent_through_a_is_replaced_by_the_verified_identity(
    ca: meshlib.CertificateAuthority,
) -> None:
    forged = f"By={SERVER_ID};Hash=abc;URI={FORGED}"
    with sidecar_pair(ca, [peer_authentication("STRICT")]) as pair, pair.client() as app_a:
        response = app_a.get("http://reviews/", headers={"x-forwarded-client-cert": forged})
    assert response.status_code == 200
    (received,) = pair.app.requests
    values = [v for k, v in received.headers if k == "x-forwarded-client-cert"]
    assert len(values) == 1
    assert FORGED not in values[0]
    assert str(peer_from_xfcc(values[0])) == CLIENT_ID


def test_a_forged_client_cert_header_from_a_plaintext_caller_grants_nothing(ca: meshlib.CertificateAuthority) -> None:
    # PERMISSIVE lets the plaintext caller in, but its header is nobody's word: dropped, and no principal.
    allow_admin = authorization("ALLOW", [FORGED.removeprefix("spiffe://")], name="admin-only")
    app = RecordingApp("reviews")
    forged = {"x-forwarded-client-cert": f"By={SERVER_ID};Hash=abc;URI={FORGED}"}
    with serving(app) as app_port:
        open_mesh = meshlib.Mesh.from_resources([peer_authentication("PERMISSIVE")], workload=SERVER, ca=ca)
        with running_sidecar(open_mesh, app=f"127.0.0.1:{app_port}") as b:
            served = httpx.get(f"{b.inbound_url}/", headers=forged, timeout=5)
            open_mesh.update([peer_authentication("PERMISSIVE"), allow_admin])
            refused = httpx.get(f"{b.inbound_url}/", headers=forged, timeout=5)
    assert served.status_code == 200
    assert served.json()["xfcc"] is None
    (received,) = app.requests
    assert "x-forwarded-client-cert" not in received.names
    assert received.header("x-forwarded-proto") == "http"
    assert refused.status_code == 403
    assert refused.text == DENIED
