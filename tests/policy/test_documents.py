"""A resource's document form (what the control plane stores and pushes) parses back to the same resource."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshlib.policy import DestinationRule, Origin, Snapshot, parse_documents, read_documents

CORPUS = Path(__file__).parent.parent / "fixtures" / "istio"
FILES = sorted(p for p in CORPUS.rglob("*") if p.suffix in (".yaml", ".yml"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CORPUS)))
def test_every_corpus_resource_round_trips_through_its_document(path: Path) -> None:
    docs, _ = read_documents([path])
    loaded = parse_documents(docs)
    for resource, _origin in loaded.resources:
        again = parse_documents([(resource.to_document(), Origin("<again>", 0))])
        assert [i for i in again.issues if i.severity == "error"] == []
        ((back, _),) = again.resources
        assert back == resource
        assert back.to_document() == resource.to_document()


def test_a_snapshot_rebuilt_from_its_documents_has_the_same_version() -> None:
    docs, _ = read_documents([CORPUS / "destination-rule-all.yaml", CORPUS / "virtual-service-reviews-80-20.yaml"])
    snapshot = Snapshot.from_resources(d for d, _ in docs)
    again = Snapshot.from_resources(r.to_document() for r in snapshot.resources)
    assert again.version == snapshot.version


def _doc(kind: str, name: str, namespace: str, spec: dict[str, object]) -> dict[str, object]:
    group = "security.istio.io/v1" if kind in ("PeerAuthentication", "AuthorizationPolicy") else "meshlib.io/v1"
    return {"apiVersion": group, "kind": kind, "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def test_a_workload_scope_keeps_its_own_inbound_policies_and_every_host() -> None:
    from meshlib.policy import Workload

    docs = read_documents([CORPUS / "destination-rule-all.yaml"])[0]
    snapshot = Snapshot.from_resources(
        [d for d, _ in docs]
        + [
            _doc("PeerAuthentication", "mesh", "istio-system", {"mtls": {"mode": "STRICT"}}),
            _doc("PeerAuthentication", "shop", "shop", {"mtls": {"mode": "PERMISSIVE"}}),
            _doc("PeerAuthentication", "other-ns", "other", {"mtls": {"mode": "DISABLE"}}),
            _doc(
                "PeerAuthentication",
                "orders-only",
                "shop",
                {"selector": {"matchLabels": {"app": "orders"}}, "mtls": {"mode": "STRICT"}},
            ),
            _doc(
                "PeerAuthentication",
                "ledger-only",
                "shop",
                {"selector": {"matchLabels": {"app": "ledger"}}, "mtls": {"mode": "DISABLE"}},
            ),
            _doc("AuthorizationPolicy", "orders-authz", "shop", {"selector": {"matchLabels": {"app": "orders"}}}),
            _doc("AuthorizationPolicy", "ledger-authz", "shop", {"selector": {"matchLabels": {"app": "ledger"}}}),
        ]
    )
    orders = Workload("orders", namespace="shop")
    scoped = Snapshot.from_resources(r.to_document() for r in snapshot.scoped_to(orders))
    refs = {r.ref for r in scoped.resources}
    assert "PeerAuthentication/shop/orders-only" in refs
    assert "PeerAuthentication/shop/ledger-only" not in refs
    assert "PeerAuthentication/other/other-ns" not in refs
    assert "AuthorizationPolicy/shop/orders-authz" in refs
    assert "AuthorizationPolicy/shop/ledger-authz" not in refs
    assert {r.ref for r in snapshot.of_kind(DestinationRule)} <= refs, "every host stays visible"
    # the scoped snapshot decides as the whole one does, for this workload
    assert scoped.mtls(orders) == snapshot.mtls(orders)
    assert scoped.authorization_policies(orders) == snapshot.authorization_policies(orders)
