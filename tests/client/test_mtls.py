"""The mesh client speaks mTLS to ``meshlib.serve`` endpoints: real certificates, real TLS, loopback servers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _upstreams import Upstream, destination_rule, service_entry, upstreams

import meshlib
import meshlib.cli as meshlib_cli
from meshlib.engine import TLS_MODE_LABEL

CLIENT = meshlib.Workload("productpage")
SERVER = meshlib.Workload("reviews")


@pytest.fixture(scope="module")
def ca() -> meshlib.CertificateAuthority:
    return meshlib.CertificateAuthority.create()


def peer_authentication(mode: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": namespace},
        "spec": {"mtls": {"mode": mode}},
    }


def mesh_config(ttl: str) -> dict[str, Any]:
    return {
        "apiVersion": "meshlib.io/v1alpha1",
        "kind": "MeshConfig",
        "metadata": {"name": "mesh", "namespace": "istio-system"},
        "spec": {"certificates": {"ttl": ttl}},
    }


def labelled_entry(*servers: Upstream, account: str | None = None) -> dict[str, Any]:
    doc = service_entry("reviews", *servers)
    for ep in doc["spec"]["endpoints"]:
        ep["labels"][TLS_MODE_LABEL] = "istio"
        if account is not None:
            ep["serviceAccount"] = account
    return doc


def server_mesh(ca: Any, mode: str = "STRICT", *extra: dict[str, Any]) -> meshlib.Mesh:
    return meshlib.Mesh.from_resources([peer_authentication(mode), *extra], workload=SERVER, ca=ca)


@pytest.fixture
def strict_servers(ca: meshlib.CertificateAuthority) -> Iterator[tuple[Upstream, ...]]:
    mesh = server_mesh(ca)
    with upstreams(Upstream("r1", mesh=mesh), Upstream("r2", version="v2", mesh=mesh)) as started:
        yield started
    mesh.close()


async def test_auto_mtls_reaches_strict_servers_and_each_side_sees_the_other(
    ca: meshlib.CertificateAuthority, strict_servers: tuple[Upstream, ...]
) -> None:
    client = meshlib.Mesh.from_resources([labelled_entry(*strict_servers)], workload=CLIENT, ca=ca)
    try:
        async with client.async_client() as http:
            # sequential calls tie on load, so the balancer picks at random: 24 miss an endpoint 1 time in 8 million
            bodies = [(await http.get("http://reviews/")).json() for _ in range(24)]
    finally:
        client.close()
    assert {b["peer"] for b in bodies} == {"spiffe://cluster.local/ns/default/sa/productpage"}
    assert {b["endpoint"] for b in bodies} == {"r1", "r2"}  # both labelled endpoints, each over mTLS


def test_the_sync_client_speaks_mtls_too(
    ca: meshlib.CertificateAuthority, strict_servers: tuple[Upstream, ...]
) -> None:
    client = meshlib.Mesh.from_resources([labelled_entry(*strict_servers)], workload=CLIENT, ca=ca)
    with client.client() as http:
        response = http.get("http://reviews/")
    assert response.status_code == 200
    assert response.json()["peer"] == "spiffe://cluster.local/ns/default/sa/productpage"
    client.close()


async def test_a_client_without_a_certificate_is_refused_by_strict(strict_servers: tuple[Upstream, ...]) -> None:
    client = meshlib.Mesh.from_resources([labelled_entry(*strict_servers)], workload=CLIENT)
    async with client.async_client() as http:
        response = await http.get("http://reviews/")
    assert response.status_code == 400
    assert "requires mutual TLS" in response.text


async def test_istio_mutual_without_a_certificate_is_a_clear_error(strict_servers: tuple[Upstream, ...]) -> None:
    rule = destination_rule("reviews", (), {"tls": {"mode": "ISTIO_MUTUAL"}})
    client = meshlib.Mesh.from_resources([service_entry("reviews", *strict_servers), rule], workload=CLIENT)
    async with client.async_client() as http:
        with pytest.raises(meshlib.NoWorkloadCertificateError, match="no workload certificate"):
            await http.get("http://reviews/")


async def test_a_server_with_the_wrong_identity_is_refused_before_the_request_leaves(
    ca: meshlib.CertificateAuthority, strict_servers: tuple[Upstream, ...]
) -> None:
    client = meshlib.Mesh.from_resources([labelled_entry(*strict_servers, account="ratings")], workload=CLIENT, ca=ca)
    hits = sum(s.hits for s in strict_servers)
    async with client.async_client() as http:
        with pytest.raises(httpx.TransportError) as info:
            await http.get("http://reviews/")
    assert "presented spiffe://cluster.local/ns/default/sa/reviews" in str(info.value)
    assert "expected spiffe://cluster.local/ns/default/sa/ratings" in str(info.value)
    assert sum(s.hits for s in strict_servers) == hits  # nothing reached the impostor's app
    client.close()


async def test_a_client_certificate_from_another_ca_is_refused(strict_servers: tuple[Upstream, ...]) -> None:
    other = meshlib.CertificateAuthority.create()
    client = meshlib.Mesh.from_resources([labelled_entry(*strict_servers)], workload=CLIENT, ca=other)
    async with client.async_client() as http:
        with pytest.raises(httpx.TransportError):
            await http.get("http://reviews/")
    client.close()


async def test_permissive_serves_mesh_and_plaintext_clients_on_one_port(ca: meshlib.CertificateAuthority) -> None:
    mesh = server_mesh(ca, "PERMISSIVE")
    with upstreams(Upstream("r1", mesh=mesh)) as servers:
        with_tls = meshlib.Mesh.from_resources([labelled_entry(*servers)], workload=CLIENT, ca=ca)
        plain = meshlib.Mesh.from_resources([labelled_entry(*servers)], workload=CLIENT)
        async with with_tls.async_client() as a, plain.async_client() as b:
            assert (await a.get("http://reviews/")).json()["peer"] == "spiffe://cluster.local/ns/default/sa/productpage"
            assert (await b.get("http://reviews/")).json()["peer"] is None
        with_tls.close()
    mesh.close()


async def test_destination_rule_disable_sends_plaintext_even_to_labelled_endpoints(
    ca: meshlib.CertificateAuthority,
) -> None:
    mesh = server_mesh(ca, "PERMISSIVE")
    with upstreams(Upstream("r1", mesh=mesh)) as servers:
        rule = destination_rule("reviews", (), {"tls": {"mode": "DISABLE"}})
        client = meshlib.Mesh.from_resources([labelled_entry(*servers), rule], workload=CLIENT, ca=ca)
        async with client.async_client() as http:
            assert (await http.get("http://reviews/")).json()["peer"] is None
        client.close()
    mesh.close()


async def test_rotation_under_continuous_load_loses_no_request(ca: meshlib.CertificateAuthority) -> None:
    short = mesh_config("3s")
    mesh = server_mesh(ca, "STRICT", short)
    with upstreams(Upstream("r1", mesh=mesh), Upstream("r2", mesh=mesh)) as servers:
        client = meshlib.Mesh.from_resources([labelled_entry(*servers), short], workload=CLIENT, ca=ca)
        assert client.certificates is not None
        assert mesh.certificates is not None
        statuses: list[int] = []
        errors: list[BaseException] = []
        stop = time.monotonic() + 5.0

        async def worker(http: httpx.AsyncClient) -> None:
            while time.monotonic() < stop:
                try:
                    statuses.append((await http.get("http://reviews/")).status_code)
                except httpx.HTTPError as exc:
                    errors.append(exc)
                await asyncio.sleep(0.005)

        # keep-alive off on half the clients: new connections (and handshakes) all along
        async with client.async_client() as pooled, client.async_client(headers={"connection": "close"}) as fresh:
            await asyncio.gather(*(worker(pooled) for _ in range(4)), *(worker(fresh) for _ in range(4)))
        assert not errors, errors[:3]
        assert len(statuses) > 100
        assert set(statuses) == {200}
        assert client.certificates.generation >= 2, "the client certificate did not rotate"
        assert mesh.certificates.generation >= 2, "the server certificate did not rotate"
        client.close()
    mesh.close()


def test_ca_folder_from_the_command_line_gives_the_mesh_its_identity(tmp_path: Path) -> None:
    folder = tmp_path / "ca"
    assert meshlib_cli.main(["ca", "init", str(folder)]) == 0
    mesh = meshlib.Mesh.from_resources([], workload=CLIENT, ca=folder)
    assert mesh.identity == "spiffe://cluster.local/ns/default/sa/productpage"
    mesh.close()


def test_a_ca_for_another_trust_domain_is_refused(ca: meshlib.CertificateAuthority) -> None:
    other = meshlib.CertificateAuthority.create("other.example")
    with pytest.raises(meshlib.SecurityError, match=r"other\.example"):
        meshlib.Mesh.from_resources([], workload=CLIENT, ca=other)


def test_renewal_thread_stops_with_the_mesh(ca: meshlib.CertificateAuthority) -> None:
    mesh = meshlib.Mesh.from_resources([], workload=CLIENT, ca=ca)
    mesh.close()
    assert not any(
        t.name.startswith("meshlib-certs") and t.is_alive()
        for t in threading.enumerate()
        if t.name.endswith("productpage")
    )


def test_the_sync_client_reports_a_refused_certificate_as_a_transport_error(
    strict_servers: tuple[Upstream, ...],
) -> None:
    other = meshlib.CertificateAuthority.create()
    client = meshlib.Mesh.from_resources([labelled_entry(*strict_servers)], workload=CLIENT, ca=other)
    with client.client() as http, pytest.raises(httpx.TransportError):
        http.get("http://reviews/")
    client.close()


def write_identity(folder: Path, ca: meshlib.CertificateAuthority, account: str) -> dict[str, str]:
    """Certificate files a DestinationRule with ``tls.mode: MUTUAL`` names."""
    from cryptography.hazmat.primitives import serialization

    key, issued = ca.issue(meshlib.SpiffeId.of("default", account))
    files = {
        "clientCertificate": folder / "cert.pem",
        "privateKey": folder / "key.pem",
        "caCertificates": folder / "ca.pem",
    }
    files["clientCertificate"].write_bytes(issued.chain_pem)
    files["caCertificates"].write_bytes(issued.bundle_pem)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    files["privateKey"].touch(mode=0o600)
    files["privateKey"].write_bytes(pem)
    return {k: str(v) for k, v in files.items()}


async def test_mutual_with_certificate_files_and_subject_alt_names(
    ca: meshlib.CertificateAuthority, strict_servers: tuple[Upstream, ...], tmp_path: Path
) -> None:
    tls = {"mode": "MUTUAL", **write_identity(tmp_path, ca, "legacy")}
    good = {**tls, "subjectAltNames": ["spiffe://cluster.local/ns/default/sa/reviews"]}
    bad = {**tls, "subjectAltNames": ["spiffe://cluster.local/ns/default/sa/ratings"]}
    entry = service_entry("reviews", *strict_servers)
    for settings, expected in ((good, "spiffe://cluster.local/ns/default/sa/legacy"), (bad, None)):
        client = meshlib.Mesh.from_resources(
            [entry, destination_rule("reviews", (), {"tls": settings})], workload=CLIENT
        )
        async with client.async_client() as http:
            if expected is None:
                with pytest.raises(httpx.TransportError, match="subjectAltNames"):
                    await http.get("http://reviews/")
            else:
                assert (await http.get("http://reviews/")).json()["peer"] == expected


async def test_missing_certificate_files_name_the_file(
    ca: meshlib.CertificateAuthority, strict_servers: tuple[Upstream, ...], tmp_path: Path
) -> None:
    tls = {"mode": "MUTUAL", **write_identity(tmp_path, ca, "legacy")}
    tls["privateKey"] = str(tmp_path / "gone.pem")
    rule = destination_rule("reviews", (), {"tls": tls})
    client = meshlib.Mesh.from_resources([service_entry("reviews", *strict_servers), rule], workload=CLIENT)
    async with client.async_client() as http:
        with pytest.raises(meshlib.CertificateError, match=r"gone\.pem"):
            await http.get("http://reviews/")
