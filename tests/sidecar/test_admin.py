"""The admin port: readiness, the configuration in force (and no secret in it), metrics from both ends."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest

import meshlib
from tests.sidecar._sidecar import CLIENT_ID, SERVER_ID, Pair, peer_authentication, sidecar_pair


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    ca = meshlib.CertificateAuthority.create()
    with sidecar_pair(ca, [peer_authentication("STRICT")]) as pair:
        yield pair


def samples(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of every sample of ``name`` in a Prometheus text page."""
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels = line[len(name) + 1 : line.rindex("}")]
            out.append(dict(re.findall(r'(\w+)="([^"]*)"', labels)))
    return out


def test_ready_is_200_with_the_snapshot_version(pair: Pair) -> None:
    response = pair.b.admin("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "snapshot": pair.b.sidecar.mesh.version}


def test_config_shows_resources_and_the_certificate_but_no_private_key(pair: Pair) -> None:
    response = pair.b.admin("/config")
    assert response.status_code == 200
    assert "PRIVATE KEY" not in response.text
    assert "-----BEGIN" not in response.text  # no PEM of any kind: identity, serial and expiry only
    config = response.json()
    assert config["workload"] == SERVER_ID
    assert config["snapshot"] == pair.b.sidecar.mesh.version
    assert config["control_plane"] is None
    certificate = config["certificate"]
    assert certificate["identity"] == SERVER_ID
    assert certificate["not_before"] <= time.time() < certificate["not_after"]
    assert certificate["expires_in"] > 0
    assert int(certificate["serial"], 16) > 0
    assert [(r["kind"], r["metadata"]["name"]) for r in config["resources"]] == [("PeerAuthentication", "default")]
    assert config["resources"][0]["spec"]["mtls"]["mode"] == "STRICT"
    # A's side: its ServiceEntry for reviews, pointing at B's inbound port.
    client = pair.a.admin("/config").json()
    assert client["certificate"]["identity"] == CLIENT_ID
    (entry,) = client["resources"]
    assert entry["kind"] == "ServiceEntry"
    assert entry["spec"]["endpoints"][0]["ports"]["http"] == pair.b.ports["inbound"]
    assert "PRIVATE KEY" not in pair.a.admin("/config").text


def test_metrics_report_source_on_outbound_and_destination_on_inbound(pair: Pair) -> None:
    with pair.client() as app_a:
        assert [app_a.get("http://reviews/").status_code for _ in range(3)] == [200] * 3
    source = [
        s for s in samples(pair.a.admin("/metrics").text, "meshlib_requests_total") if s["response_code"] == "200"
    ]
    assert source
    assert {s["reporter"] for s in source} == {"source"}
    assert {s["source_workload"] for s in source} == {"productpage"}
    assert {s["destination_service"] for s in source} == {"reviews.default.svc.cluster.local"}
    assert {s["connection_security_policy"] for s in source} == {"mutual_tls"}
    destination = samples(pair.b.admin("/metrics").text, "meshlib_requests_total")
    assert destination
    assert {s["reporter"] for s in destination} == {"destination"}
    assert {s["source_principal"] for s in destination} == {CLIENT_ID.removeprefix("spiffe://")}  # Istio's form
    assert {s["connection_security_policy"] for s in destination} == {"mutual_tls"}


def test_unknown_admin_paths_are_404_and_the_admin_port_is_read_only(pair: Pair) -> None:
    assert pair.a.admin("/nothing").status_code == 404
    assert httpx.post(f"{pair.a.admin_url}/config", timeout=5).status_code == 405
