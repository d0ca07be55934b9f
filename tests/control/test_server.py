"""The control plane over HTTP: changes, history, auth, push with ACK/NACK, registry, CA, restart."""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from meshlib.policy import SpiffeId
from meshlib.security._ca import make_csr, new_private_key
from tests._upstreams import destination_rule, service_entry, to, virtual_service
from tests.control._cp import RunningControlPlane, running_control_plane
from tests.control._sse import Subscriber, endpoints, kinds

PAYMENTS = service_entry("payments", ("127.0.0.1:9001", "v1"), ("127.0.0.1:9002", "v2"))
PAYMENTS_DR = destination_rule("payments", ("v1", "v2"))


def authz(name: str, app: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": app}},
            "action": "DENY",
            "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}],
        },
    }


@pytest.fixture
def cp(tmp_path: Path) -> Any:
    with running_control_plane(tmp_path, [PAYMENTS, PAYMENTS_DR], registry_ttl=0.6) as running:
        yield running


def admin(cp: RunningControlPlane, token: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=cp.url, headers={"authorization": f"Bearer {token or cp.admin_token}"}, timeout=10)


# -- changes ---------------------------------------------------------------------------


def test_every_accepted_change_is_a_numbered_version_with_its_author(cp: RunningControlPlane) -> None:
    assert cp.get("/healthz")["version"] == 1
    r = cp.apply([virtual_service("payments", {"route": [to("payments", "v1")]})])
    assert r.status_code == 200
    assert r.json() == {"version": 2, "changed": True}
    again = cp.apply([virtual_service("payments", {"route": [to("payments", "v1")]})])
    assert again.json() == {"version": 2, "changed": False}, "the same content is no new version"
    history = cp.get("/v1/history")["history"]
    assert [h["version"] for h in history] == [2, 1]
    assert history[0]["who"] == "admin:admin"
    assert history[0]["changes"] == [{"op": "created", "ref": "VirtualService/default/payments"}]
    listed = cp.get("/v1/resources?kind=VirtualService")["resources"]
    assert [d["metadata"]["name"] for d in listed] == ["payments"]
    one = cp.get("/v1/resources/VirtualService/default/payments")
    assert one["spec"]["http"][0]["route"][0]["destination"]["subset"] == "v1"


def test_a_bad_change_is_refused_as_a_whole_naming_resource_and_field(cp: RunningControlPlane) -> None:
    good = virtual_service("payments", {"route": [to("payments", "v1")]})
    bad = virtual_service("reviews", {"route": [to("payments", "v9")]})
    r = cp.apply([good, bad])
    assert r.status_code == 400
    errors = r.json()["errors"]
    assert any(
        e["resource"] == "VirtualService/default/reviews" and e["field"] == "spec.http[0].route[0].destination.subset"
        for e in errors
    ), errors
    assert cp.get("/healthz")["version"] == 1
    assert cp.get("/v1/resources?kind=VirtualService")["resources"] == [], "nothing of a refused change lands"


def test_unparseable_yaml_and_unknown_fields_get_clear_errors(cp: RunningControlPlane) -> None:
    r = cp.apply("kind: [unclosed\n")
    assert r.status_code == 400
    assert "line" in r.json()["error"]
    typo = dict(PAYMENTS_DR)
    typo["spec"] = {**PAYMENTS_DR["spec"], "trafficPolicyy": {}}
    r = cp.apply([typo])
    assert r.status_code == 400
    assert any(e["field"] == "spec.trafficPolicyy" for e in r.json()["errors"])


def test_delete_and_rollback_make_new_versions(cp: RunningControlPlane) -> None:
    assert cp.apply([virtual_service("payments", {"route": [to("payments", "v2")]})]).json()["version"] == 2
    assert cp.delete("VirtualService/default/payments").json() == {"version": 3}
    assert cp.delete("VirtualService/default/payments").status_code == 404
    with admin(cp) as c:
        r = c.post("/v1/rollback", json={"version": 2})
        assert r.json() == {"version": 4}
        assert c.post("/v1/rollback", json={"version": 99}).status_code == 404
    assert (
        cp.get("/v1/resources/VirtualService/default/payments")["spec"]["http"][0]["route"][0]["destination"]["subset"]
        == "v2"
    )
    assert cp.get("/v1/history")["history"][0]["action"] == "rollback to 2"


# -- auth --------------------------------------------------------------------------------


def test_admin_api_needs_an_admin_token(cp: RunningControlPlane) -> None:
    workload_token = cp.token("default", "order")
    with httpx.Client(base_url=cp.url) as c:
        assert c.get("/v1/resources").status_code == 401
        assert c.get("/v1/resources", headers={"authorization": "Bearer mlt_wrong"}).status_code == 401
        r = c.post("/v1/resources", content="{}", headers={"authorization": f"Bearer {workload_token}"})
        assert r.status_code == 403
        assert c.post("/v1/tokens", json={"service_account": "x"}).status_code == 401
    assert cp.get("/healthz")["version"] == 1


def test_a_workload_token_speaks_only_for_its_identity(cp: RunningControlPlane) -> None:
    token = cp.token("default", "order")
    with Subscriber(cp.url, token, workload="payments") as sub:
        assert sub.status_code == 403
        assert "default/order" in sub.error_body
    with httpx.Client(base_url=cp.url, headers={"authorization": f"Bearer {token}"}) as c:
        r = c.post("/v1/register", json={"node": "n", "workload": "payments", "address": "127.0.0.1", "port": 1})
        assert r.status_code == 403


def test_a_revoked_token_is_refused_everywhere(cp: RunningControlPlane) -> None:
    token = cp.token("default", "order")
    with admin(cp) as c:
        assert c.post("/v1/tokens/revoke", json={"token": token}).status_code == 204
        assert c.post("/v1/tokens/revoke", json={"token": token}).status_code == 404
    key = new_private_key()
    with httpx.Client(base_url=cp.url, headers={"authorization": f"Bearer {token}"}) as c:
        csr = make_csr(SpiffeId.of("default", "order"), key).decode()
        assert c.post("/v1/certificate", json={"csr": csr}).status_code == 401
    with Subscriber(cp.url, token) as sub:
        assert sub.status_code == 401


def test_tokens_are_stored_hashed_only(cp: RunningControlPlane, tmp_path: Path) -> None:
    token = cp.token("default", "order")
    stored = b"".join(p.read_bytes() for p in (tmp_path / "control-plane").rglob("*") if p.is_file())
    assert token.encode() not in stored
    assert cp.admin_token.encode() not in stored


# -- push ----------------------------------------------------------------------------------


def test_a_data_plane_gets_full_state_then_each_change_and_only_its_own_policies(cp: RunningControlPlane) -> None:
    cp.apply([authz("deny-order", "order"), authz("deny-ledger", "ledger")])
    with Subscriber(cp.url, cp.token("default", "order")) as sub:
        first = sub.next_push()
        assert first["version"] == 2
        got = kinds(first)
        assert got["ServiceEntry"] == ["default/payments"]
        assert got["DestinationRule"] == ["default/payments"]
        assert got["AuthorizationPolicy"] == ["default/deny-order"], "another workload's policy is not sent"
        start = time.monotonic()
        cp.apply([virtual_service("payments", {"route": [to("payments", "v2")]})])
        pushed = sub.next_push(timeout=2)
        assert time.monotonic() - start < 1.0
        assert pushed["version"] == 3
        assert "VirtualService" in kinds(pushed)
        cp.apply([authz("deny-ledger-2", "ledger")])  # nothing of order's view changes
        with pytest.raises(queue.Empty):
            sub.next_push(timeout=0.5)


def test_ack_and_nack_are_reported_per_data_plane(cp: RunningControlPlane) -> None:
    def refuse_version_3(push: dict[str, Any]) -> str | None:
        return "access log /forbidden/x: Permission denied" if push["version"] == 3 else None

    with Subscriber(cp.url, cp.token("default", "order"), node="order-1", answer=refuse_version_3) as sub:
        sub.next_push()
        cp.wait_for(lambda: [d for d in cp.dataplanes() if d["state"] == "ACKED"], what="the ACK")
        cp.apply([virtual_service("payments", {"route": [to("payments", "v1")]})])
        sub.next_push()
        cp.apply([virtual_service("payments", {"route": [to("payments", "v2")]})])
        sub.next_push()
        plane = cp.wait_for(lambda: next((d for d in cp.dataplanes() if d["state"] == "NACKED"), None), what="the NACK")
        assert plane["node"] == "order-1"
        assert plane["acked_version"] == 2, "it still runs version 2"
        assert plane["last_nack"]["version"] == 3
        assert "Permission denied" in plane["last_nack"]["error"]
        assert plane["workload"] == "order"
        assert plane["namespace"] == "default"


# -- registry -----------------------------------------------------------------------------


def test_registered_workloads_join_their_service_and_leave_after_the_ttl(cp: RunningControlPlane) -> None:
    payments_token = cp.token("default", "payments")
    reg = {
        "node": "pay-1",
        "workload": "payments",
        "address": "127.0.0.1",
        "port": 9100,
        "tls": True,
        "labels": {"version": "v3"},
    }
    with Subscriber(cp.url, cp.token("default", "order")) as sub:
        assert len(endpoints(sub.next_push(), "payments")) == 2
        with httpx.Client(base_url=cp.url, headers={"authorization": f"Bearer {payments_token}"}) as c:
            assert c.post("/v1/register", json=reg).status_code == 200
            push = sub.push_where(lambda p: len(endpoints(p, "payments")) == 3)
            joined = next(e for e in endpoints(push, "payments") if e["ports"]["http"] == 9100)
            assert joined["labels"] == {"version": "v3", "app": "payments", "security.istio.io/tlsMode": "istio"}
            assert joined["serviceAccount"] == "payments"
            for _ in range(4):  # heartbeats keep it in past the ttl
                time.sleep(0.3)
                assert c.post("/v1/register", json=reg).status_code == 200
            assert [r["port"] for r in cp.get("/v1/registry")["registrations"]] == [9100]
        gone = sub.push_where(lambda p: len(endpoints(p, "payments")) == 2, timeout=3)
        assert {e["ports"]["http"] for e in endpoints(gone, "payments")} == {9001, 9002}, "static endpoints stay"


def test_a_workload_with_no_service_entry_gets_one_made(cp: RunningControlPlane) -> None:
    token = cp.token("default", "ledger")
    with httpx.Client(base_url=cp.url, headers={"authorization": f"Bearer {token}"}) as c:
        r = c.post("/v1/register", json={"node": "l-1", "workload": "ledger", "address": "127.0.0.1", "port": 9200})
        assert r.json()["ttl"] == 0.6
        with Subscriber(cp.url, cp.token("default", "order")) as sub:
            push = sub.push_where(lambda p: bool(endpoints(p, "ledger.default.svc.cluster.local")))
            (ep,) = endpoints(push, "ledger.default.svc.cluster.local")
            assert ep["address"] == "127.0.0.1"
            assert ep["ports"] == {"http": 9200}
        assert c.delete(f"/v1/register/{r.json()['id']}").status_code == 204
    assert cp.get("/v1/registry")["registrations"] == []


def test_bad_registrations_are_refused_clearly(cp: RunningControlPlane) -> None:
    token = cp.token("default", "order")
    with httpx.Client(base_url=cp.url, headers={"authorization": f"Bearer {token}"}) as c:
        r = c.post("/v1/register", json={"node": "n", "workload": "order", "address": "127.0.0.1", "port": 70000})
        assert r.status_code == 400
        assert "port" in r.json()["error"]
        r = c.post("/v1/register", content=b"not json")
        assert r.status_code == 400


# -- CA -------------------------------------------------------------------------------------


def test_a_workload_gets_a_certificate_for_its_own_identity_only(cp: RunningControlPlane) -> None:
    token = cp.token("shop", "order")
    key = new_private_key()
    mine = make_csr(SpiffeId.of("shop", "order"), key).decode()
    theirs = make_csr(SpiffeId.of("shop", "payments"), key).decode()
    with httpx.Client(base_url=cp.url, headers={"authorization": f"Bearer {token}"}) as c:
        r = c.post("/v1/certificate", json={"csr": mine})
        assert r.status_code == 200
        leaf = x509.load_pem_x509_certificates(r.json()["certificate_chain"].encode())[0]
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local/ns/shop/sa/order"]
        refused = c.post("/v1/certificate", json={"csr": theirs})
        assert refused.status_code == 403
        assert "refused" in refused.json()["error"]
    with admin(cp) as c:
        assert c.post("/v1/certificate", json={"csr": mine}).status_code == 403
    with httpx.Client(base_url=cp.url) as c:
        assert c.post("/v1/certificate", json={"csr": mine}).status_code == 401


# -- restart --------------------------------------------------------------------------------


def test_the_embedded_store_survives_a_restart(cp: RunningControlPlane) -> None:
    token = cp.token("default", "order")
    cp.apply([virtual_service("payments", {"route": [to("payments", "v2")]})])
    cp.stop_serving()
    cp.start_serving()
    assert cp.get("/healthz")["version"] == 2
    assert [h["version"] for h in cp.get("/v1/history")["history"]] == [2, 1]
    with Subscriber(cp.url, token) as sub:
        assert sub.next_push()["version"] == 2, "the token survived too"
