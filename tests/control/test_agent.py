"""The data-plane agent against a real control plane: live pushes, NACKs, outages, the cache, the registry, mTLS.

Every control plane is a real ``ControlPlane`` served by uvicorn on a loopback port
(``tests/control/_cp.py``); every upstream a real uvicorn server; every client a real
``Mesh.connect`` mesh with its agent thread. The control planes run with short
keepalive and registry TTLs so outages and expiries show within a second or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _upstreams import (
    Upstream,
    dead_address,
    destination_rule,
    free_port,
    service_entry,
    serving,
    to,
    upstreams,
    virtual_service,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import meshlib
from meshlib import CertificateRequestError, ControlPlaneAuthError, ControlPlaneUnavailableError
from meshlib.control import Agent, RemoteIssuer, default_cache_dir, read_cache
from meshlib.control._agent import CACHE_FILE, _age, _sse_events, backoff, write_cache
from meshlib.policy import SpiffeId, Workload
from meshlib.security import make_csr, new_private_key
from tests.control._cp import RunningControlPlane, running_control_plane

HOST = "reviews"
KEEPALIVE = 0.5


def connect(
    cp: RunningControlPlane, tmp_path: Path, workload: str | Workload = "order", **options: Any
) -> meshlib.Mesh:
    """A connected mesh, made the way a sync service makes one: in a loop that closes at once."""
    who = Workload.coerce(workload)
    token = options.pop("token", None) or cp.token(who.namespace, who.service_account)
    options.setdefault("cache_dir", tmp_path / f"cache-{who.name}")
    options.setdefault("keepalive", KEEPALIVE)
    return asyncio.run(meshlib.Mesh.connect(cp.url, workload=who, token=token, **options))


def apply(cp: RunningControlPlane, docs: list[dict[str, Any]]) -> int:
    """Apply documents through the admin API; the new version."""
    r = cp.apply(docs)
    assert r.status_code == 200, r.text
    return int(r.json()["version"])


def control_plane(
    tmp_path: Path, docs: list[dict[str, Any]] | None = None, **options: Any
) -> contextlib.AbstractContextManager[RunningControlPlane]:
    """A running control plane holding ``docs``, with a short keepalive so outages show at once."""
    options.setdefault("keepalive", KEEPALIVE)
    return running_control_plane(tmp_path, config=docs or (), **options)


def routed(v1: Upstream, v2: Upstream, subset: str) -> list[dict[str, Any]]:
    return [
        service_entry(HOST, v1, v2),
        destination_rule(HOST, ("v1", "v2")),
        virtual_service(HOST, {"route": [to(HOST, subset)]}),
    ]


def mesh_config(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "meshlib.io/v1alpha1",
        "kind": "MeshConfig",
        "metadata": {"name": "mesh", "namespace": "istio-system"},
        "spec": spec,
    }


class Traffic:
    """A sync client calling ``url`` in a loop from a thread: what answered, and every failure."""

    def __init__(self, mesh: meshlib.Mesh, url: str = f"http://{HOST}/") -> None:
        self.mesh = mesh
        self.url = url
        self.answers: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.mesh.client(timeout=5) as client:
            while not self._stop.is_set():
                try:
                    r = client.get(self.url)
                    if r.status_code != 200:
                        self.failures.append(f"HTTP {r.status_code}")
                    else:
                        self.answers.append((time.monotonic(), r.json()["version"]))
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                time.sleep(0.002)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def first_after(self, start: float, version: str) -> float | None:
        return next((t for t, v in self.answers if t >= start and v == version), None)

    def wait_answers(self, count: int, timeout: float = 5.0) -> None:
        limit = time.monotonic() + timeout
        target = len(self.answers) + count
        while len(self.answers) < target:
            assert time.monotonic() < limit, f"traffic stalled: {self.failures[-3:]}"
            time.sleep(0.01)


@pytest.fixture
def pair() -> Iterator[tuple[Upstream, Upstream]]:
    with upstreams(Upstream("a", version="v1"), Upstream("b", version="v2")) as (v1, v2):
        yield v1, v2


def dataplane(cp: RunningControlPlane, mesh: meshlib.Mesh) -> dict[str, Any]:
    assert mesh.agent is not None
    node = mesh.agent.node
    return next(d for d in cp.dataplanes() if d["node"] == node)


# -- pieces ---------------------------------------------------------------------------


def test_backoff_is_full_jitter_doubling_from_a_fifth_of_a_second_to_ten() -> None:
    for attempt, high in ((1, 0.2), (2, 0.4), (4, 1.6), (7, 10.0), (50, 10.0)):
        draws = [backoff(attempt) for _ in range(300)]
        assert all(0.0 <= d <= high for d in draws)
        assert max(draws) > 0.8 * high  # the whole window is used
        assert min(draws) < 0.2 * high  # full jitter: down to zero, so reconnections spread


def test_the_cache_is_written_whole_and_read_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "cache"
    assert read_cache(folder) is None
    write_cache(folder, 7, "abc", [service_entry(HOST, ("127.0.0.1:1", "v1"))])
    cached = read_cache(folder)
    assert cached is not None
    assert (cached.version, cached.nonce, cached.resources[0]["kind"]) == (7, "abc", "ServiceEntry")
    assert cached.age() < 5
    assert [p.name for p in folder.iterdir()] == [CACHE_FILE]  # no temporary file left behind
    (folder / CACHE_FILE).write_text('{"version": 7, "resou')  # a torn file from another tool
    with caplog.at_level(logging.WARNING, "meshlib.control"):
        assert read_cache(folder) is None
    assert "cannot be read" in caplog.text


def test_the_default_cache_dir_is_per_workload(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    wl = Workload("order", namespace="shop")
    monkeypatch.setenv("MESHLIB_CACHE_DIR", str(tmp_path / "m"))
    assert default_cache_dir(wl) == tmp_path / "m" / "shop.order"
    monkeypatch.delenv("MESHLIB_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir(wl) == tmp_path / "xdg" / "meshlib" / "shop.order"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir(wl) == tmp_path / "home" / ".cache" / "meshlib" / "shop.order"


def test_ages_read_at_a_glance() -> None:
    assert [_age(s) for s in (5, 192, 7500, 3 * 86400 + 4 * 3600)] == ["5s", "3m12s", "2h05m", "3d04h"]


async def test_server_sent_events_are_parsed_with_comments_skipped() -> None:
    async def lines() -> Any:
        for line in [": connected", "", "event: snapshot", "id: n1", "data: {", "data: }", "", ": keepalive", ""]:
            yield line

    events = [e async for e in _sse_events(lines())]
    assert [(e.type, e.id, e.data) for e in events] == [("snapshot", "n1", "{\n}")]


# -- live configuration ---------------------------------------------------------------


def test_a_change_reaches_a_live_client_within_a_second_without_a_failed_request(
    tmp_path: Path, pair: tuple[Upstream, Upstream]
) -> None:
    v1, v2 = pair
    with control_plane(tmp_path, routed(v1, v2, "v1")) as cp:
        mesh = connect(cp, tmp_path)
        try:
            assert mesh.agent is not None
            assert mesh.agent.version == cp.plane.version
            assert not mesh.agent.stale
            with Traffic(mesh) as traffic:
                traffic.wait_answers(20)
                start = time.monotonic()
                version = apply(cp, [virtual_service(HOST, {"route": [to(HOST, "v2")]})])
                assert mesh.agent.wait_for_version(version, timeout=1.0)
                traffic.wait_answers(20)
            switched = traffic.first_after(start, "v2")
            assert switched is not None
            assert switched - start < 1.0
            assert all(v == "v2" for t, v in traffic.answers if t > switched)
            assert traffic.failures == []
            # The control plane sees what the data plane runs: the version and its content hash.
            status = cp.wait_for(lambda: (d := dataplane(cp, mesh))["state"] == "ACKED" and d, what="the ACK")
            assert status["acked_version"] == version
            assert status["acked_snapshot"] == mesh.version
            # ...and the cache holds it for the next start.
            cached = read_cache(mesh.agent.cache_dir)
            assert cached is not None
            assert cached.version == version
        finally:
            mesh.close()


def test_a_snapshot_the_data_plane_cannot_apply_is_nacked_and_the_old_one_keeps_serving(
    tmp_path: Path, pair: tuple[Upstream, Upstream], caplog: pytest.LogCaptureFixture
) -> None:
    v1, v2 = pair
    with control_plane(tmp_path, routed(v1, v2, "v1")) as cp:
        mesh = connect(cp, tmp_path)
        try:
            assert mesh.agent is not None
            good = mesh.agent.version
            snapshot = mesh.version
            # Valid for the control plane, but this data plane cannot open the access log it names.
            bad_path = tmp_path / "no-such-folder" / "access.log"
            with Traffic(mesh) as traffic, caplog.at_level(logging.ERROR, "meshlib.control"):
                refused = apply(cp, [mesh_config(accessLog={"path": str(bad_path)}), *routed(v1, v2, "v2")])
                status = cp.wait_for(lambda: (d := dataplane(cp, mesh))["state"] == "NACKED" and d, what="the NACK")
                traffic.wait_answers(20)
            assert str(bad_path) in status["last_nack"]["error"]
            assert status["last_nack"]["version"] == refused
            assert status["acked_version"] == good  # it still runs the last good version
            assert mesh.agent.version == good
            assert mesh.version == snapshot
            assert str(bad_path) in (mesh.agent.last_nack or "")
            assert {v for _, v in traffic.answers} == {"v1"}
            assert traffic.failures == []
            assert f"NACK control plane version {refused}" in caplog.text
            # The next good change is applied as usual.
            fixed = apply(cp, [mesh_config(), *routed(v1, v2, "v2")])
            assert mesh.agent.wait_for_version(fixed, timeout=2)
            with mesh.client() as client:
                assert client.get(f"http://{HOST}/").json()["version"] == "v2"
        finally:
            mesh.close()


# -- outages --------------------------------------------------------------------------


def test_the_control_plane_stopping_mid_traffic_fails_no_request_and_the_agent_reconverges(
    tmp_path: Path, pair: tuple[Upstream, Upstream], caplog: pytest.LogCaptureFixture
) -> None:
    v1, v2 = pair
    with control_plane(tmp_path, routed(v1, v2, "v1")) as cp:
        mesh = connect(cp, tmp_path)
        agent = mesh.agent
        assert agent is not None
        try:
            with Traffic(mesh) as traffic, caplog.at_level(logging.WARNING, "meshlib.control"):
                traffic.wait_answers(10)
                cp.stop_serving()
                cp.wait_for(lambda: agent.stale and not agent.connected, what="the agent to notice")
                traffic.wait_answers(50)  # served on the last snapshot while the control plane is away
                assert "disconnected" in caplog.text
                assert "stale until it reconnects" in caplog.text
                cp.start_serving()
                cp.wait_for(lambda: agent.connected and not agent.stale, timeout=15, what="the reconnection")
                assert agent.wait_for_version(
                    apply(cp, [virtual_service(HOST, {"route": [to(HOST, "v2")]})]), timeout=2
                )
                start = time.monotonic()
                traffic.wait_answers(10)
            assert traffic.failures == []
            assert traffic.first_after(start, "v2") is not None
            assert cp.wait_for(lambda: dataplane(cp, mesh)["state"] == "ACKED", what="the ACK")
        finally:
            mesh.close()


def test_a_data_plane_restarting_with_the_control_plane_down_boots_from_its_cache(
    tmp_path: Path, pair: tuple[Upstream, Upstream], caplog: pytest.LogCaptureFixture
) -> None:
    v1, v2 = pair
    cache = tmp_path / "cache"
    with control_plane(tmp_path, routed(v1, v2, "v2")) as cp:
        token = cp.token("default", "order")
        first = connect(cp, tmp_path, token=token, cache_dir=cache)
        assert first.certificates is not None
        serial = first.certificates.issued.serial
        version = first.agent.version if first.agent else None
        first.close()
        cp.stop_serving()
        # The cache was written 3m12s ago, as far as the next start can tell.
        path = cache / CACHE_FILE
        stored = json.loads(path.read_text())
        stored["written_at"] -= 192
        path.write_text(json.dumps(stored))
        with caplog.at_level(logging.WARNING, "meshlib.control"):
            started = time.monotonic()
            mesh = connect(cp, tmp_path, token=token, cache_dir=cache, timeout=5)
            took = time.monotonic() - started
        try:
            assert took < 2  # the first failed attempt is enough when there is a cache
            assert mesh.agent is not None
            assert mesh.agent.stale
            assert mesh.agent.version == version
            assert (
                f"control plane {cp.url} unreachable (ConnectError); serving cached configuration version "
                f"{version} from 3m12s ago, stale until it reconnects"
            ) in caplog.text
            # Same routing as before the restart, same identity from the cached certificate.
            assert mesh.certificates is not None
            assert mesh.certificates.issued.serial == serial
            with mesh.client() as client:
                assert client.get(f"http://{HOST}/").json()["version"] == "v2"
            # The control plane comes back: the agent reconnects and is no longer stale.
            cp.start_serving()
            agent = mesh.agent
            cp.wait_for(lambda: not agent.stale, timeout=15, what="the reconnection")
            assert dataplane(cp, mesh)["acked_version"] == version
        finally:
            mesh.close()


def test_no_control_plane_and_no_cache_is_a_clear_error(tmp_path: Path) -> None:
    url = f"http://{dead_address()}"
    started = time.monotonic()
    with pytest.raises(ControlPlaneUnavailableError) as info:
        asyncio.run(
            meshlib.Mesh.connect(url, workload="order", token="mlt_x", cache_dir=tmp_path / "none", timeout=0.5)
        )
    assert time.monotonic() - started < 2
    message = str(info.value)
    assert url in message
    assert "ConnectError" in message
    assert str(tmp_path / "none") in message
    assert isinstance(info.value, meshlib.MeshError)
    assert not [t for t in threading.enumerate() if t.name.startswith("meshlib-agent-order")]


def test_a_bad_token_is_refused_at_once_and_never_answered_from_the_cache(
    tmp_path: Path, pair: tuple[Upstream, Upstream]
) -> None:
    v1, v2 = pair
    cache = tmp_path / "cache"
    with control_plane(tmp_path, routed(v1, v2, "v1")) as cp:
        connect(cp, tmp_path, cache_dir=cache).close()  # a cache exists
        started = time.monotonic()
        with pytest.raises(ControlPlaneAuthError, match=r"refused the token.*401.*unknown"):
            connect(cp, tmp_path, token="mlt_not-a-token", cache_dir=cache, timeout=5)
        assert time.monotonic() - started < 2
        # A token bound to another identity.
        with pytest.raises(ControlPlaneAuthError, match=r"403.*bound to one namespace and service account"):
            connect(cp, tmp_path, "reviews", token=cp.token("default", "order"), cache_dir=cache)


class ScriptedControlPlane:
    """A stand-in control plane whose stream sends scripted events, then nothing (no keepalive) until dropped.

    ``events(n)`` gives the raw SSE text for the n-th connection (from 1); ``streams``
    records when each connection came, ``acks`` every ACK/NACK body. It has no CA
    (501), as a control plane started without one.
    """

    def __init__(self, events: Any) -> None:
        self.events = events
        self.streams: list[float] = []
        self.acks: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        if path == "/v1/stream":
            self.streams.append(time.monotonic())
            headers = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            body = self.events(len(self.streams)).encode()
            await send({"type": "http.response.body", "body": body, "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if path == "/v1/ack":
            self.acks.append(json.loads(body))
        await send({"type": "http.response.start", "status": 501 if path == "/v1/certificate" else 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def wait_acks(self, count: int, timeout: float = 3.0) -> list[dict[str, Any]]:
        limit = time.monotonic() + timeout
        while len(self.acks) < count:
            assert time.monotonic() < limit, f"only {len(self.acks)} ACKs: {self.acks}"
            time.sleep(0.01)
        return self.acks


def snapshot_event(version: int, resources: list[dict[str, Any]], nonce: str | None = None) -> str:
    data = json.dumps({"version": version, "nonce": nonce or f"n{version}", "resources": resources})
    return f"event: snapshot\nid: {nonce or f'n{version}'}\ndata: {data}\n\n"


def test_a_stream_silent_for_three_keepalives_is_reconnected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A control plane (or a proxy before it) that holds the stream open but sends nothing is taken for dead."""
    fake = ScriptedControlPlane(lambda n: snapshot_event(n, []))
    with serving(fake, timeout_graceful_shutdown=0.1) as port, caplog.at_level(logging.WARNING, "meshlib.control"):
        mesh = asyncio.run(
            meshlib.Mesh.connect(
                f"http://127.0.0.1:{port}", workload="order", token="t", cache_dir=tmp_path, keepalive=0.2
            )
        )
        try:
            assert mesh.agent is not None
            assert mesh.certificates is None  # no CA there: plaintext
            assert mesh.agent.wait_for_version(2, timeout=5)
            assert fake.streams[1] - fake.streams[0] >= 0.6  # three keepalives of silence first
            assert "silent for 0.6 s" in caplog.text
            acks = fake.wait_acks(2)
            assert [a["nonce"] for a in acks[:2]] == ["n1", "n2"]
            assert acks[0]["error"] is None
            assert acks[0]["snapshot"] == mesh.version
        finally:
            mesh.close()


def test_snapshots_that_do_not_parse_or_validate_here_are_nacked_and_change_nothing(
    tmp_path: Path, pair: tuple[Upstream, Upstream]
) -> None:
    """Version skew: the control plane sends what this data plane's meshlib refuses; it says why, keeps running."""
    v1, _ = pair
    good = [service_entry(HOST, v1)]
    bad_route = virtual_service(HOST, {"route": [to(HOST, "v9")]})  # a subset no DestinationRule defines
    newer_kind = {"apiVersion": "meshlib.io/v1alpha2", "kind": "TrafficShadow", "metadata": {"name": "x"}}
    script = (
        snapshot_event(1, good)
        + "event: snapshot\nid: torn\ndata: {not json\n\n"
        + snapshot_event(2, [*good, bad_route])
        + snapshot_event(3, [*good, newer_kind])
    )
    fake = ScriptedControlPlane(lambda n: script)
    with serving(fake, timeout_graceful_shutdown=0.1) as port:
        mesh = asyncio.run(
            meshlib.Mesh.connect(f"http://127.0.0.1:{port}", workload="order", token="t", cache_dir=tmp_path)
        )
        try:
            acks = fake.wait_acks(4)
            assert [(a["nonce"], a["error"] is None) for a in acks] == [
                ("n1", True),
                ("torn", False),
                ("n2", False),
                ("n3", False),
            ]
            assert "unreadable snapshot event" in acks[1]["error"]
            assert "VirtualService/default/reviews" in acks[2]["error"]
            assert "spec.http[0].route[0].destination.subset" in acks[2]["error"]
            assert "unknown kind 'TrafficShadow'" in acks[3]["error"]
            assert acks[2]["version"] == 2
            assert all(a["snapshot"] == mesh.version for a in acks)  # NACKs name the snapshot still in force
            assert mesh.agent is not None
            assert mesh.agent.version == 1
            cached = read_cache(tmp_path)
            assert cached is not None
            assert cached.version == 1
            with mesh.client() as client:
                assert client.get(f"http://{HOST}/").json()["endpoint"] == "a"
        finally:
            mesh.close()


# -- registry and certificates ---------------------------------------------------------


def test_a_served_workload_registers_is_routable_and_leaves_the_pool_after_the_ttl(tmp_path: Path) -> None:
    service = "reviews.default.svc.cluster.local"
    strict = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "istio-system"},
        "spec": {"mtls": {"mode": "STRICT"}},
    }
    mutual = destination_rule(service, (), {"tls": {"mode": "ISTIO_MUTUAL"}})
    with control_plane(tmp_path, [strict, mutual], registry_ttl=1.0) as cp:
        reviews = connect(cp, tmp_path, Workload("reviews", labels={"version": "v3"}))
        order = connect(cp, tmp_path, "order")
        assert reviews.agent is not None
        assert order.agent is not None
        upstream = Upstream("r1", version="v3", mesh=reviews).start()  # a MeshServer: registers once listening
        try:
            registry = cp.wait_for(lambda: cp.get("/v1/registry")["registrations"], what="the registration")
            assert [(r["address"], r["port"], r["tls"]) for r in registry] == [("127.0.0.1", upstream.port, True)]
            assert registry[0]["labels"] == {"version": "v3"}
            url = f"http://{service}/"
            deadline = time.monotonic() + 5
            with order.client(timeout=5) as client:
                while True:  # the registry change is pushed to order
                    try:
                        answer = client.get(url).json()
                        break
                    except meshlib.MeshError:
                        assert time.monotonic() < deadline
                        time.sleep(0.05)
                # Over the mesh's mTLS (ISTIO_MUTUAL to a STRICT server), certificates from the control plane's CA.
                assert answer["endpoint"] == "r1"
                assert answer["peer"] == "spiffe://cluster.local/ns/default/sa/order"
                # The workload dies without a word (no deregistration): its heartbeats stop...
                reviews.agent.close(deregister=False)
                started = time.monotonic()
                cp.wait_for(lambda: not cp.get("/v1/registry")["registrations"], timeout=5, what="the expiry")
                assert time.monotonic() - started < 3  # ttl 1 s (+ the heartbeat it last sent)
                # ...and order's view loses the endpoint.
                deadline = time.monotonic() + 3
                while True:
                    try:
                        client.get(url)
                    except meshlib.MeshError:
                        break
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        finally:
            upstream.stop()
            reviews.close()
            order.close()


@pytest.mark.parametrize(
    ("bind", "advertise", "registered"),
    [("127.0.0.1", "127.0.0.2", "127.0.0.2"), ("0.0.0.0", None, "127.0.0.1")],
    ids=["advertised", "wildcard"],
)
def test_a_server_registers_where_it_is_reached_and_deregisters_at_shutdown(
    tmp_path: Path, bind: str, advertise: str | None, registered: str
) -> None:
    """A wildcard bind registers the address the control plane is reached from, unless ``advertise`` says."""
    with control_plane(tmp_path, registry_ttl=30.0) as cp:
        mesh = connect(cp, tmp_path, "reviews")
        try:
            with serving(Upstream("r").app, mesh=mesh, host=bind, port=free_port(), advertise=advertise) as port:
                registry = cp.wait_for(lambda: cp.get("/v1/registry")["registrations"], what="the registration")
                assert (registry[0]["address"], registry[0]["port"]) == (registered, port)
            assert cp.get("/v1/registry")["registrations"] == []  # long before the 30 s ttl
        finally:
            mesh.close()


def test_registrations_come_back_after_a_control_plane_restart(tmp_path: Path) -> None:
    with control_plane(tmp_path, registry_ttl=1.5) as cp:
        mesh = connect(cp, tmp_path, "reviews")
        agent = mesh.agent
        assert agent is not None
        try:
            registration = agent.register("127.0.0.1", 9999)
            assert registration.wait(5)
            assert registration.ttl == 1.5
            cp.stop_serving()
            time.sleep(2)  # past the ttl: the file store keeps ttl keys in memory only
            cp.start_serving()
            cp.wait_for(lambda: cp.get("/v1/registry")["registrations"], timeout=5, what="the re-registration")
            agent.deregister(registration).result(5)
            assert cp.get("/v1/registry")["registrations"] == []
        finally:
            mesh.close()


def test_a_token_cannot_get_a_certificate_for_another_identity(tmp_path: Path) -> None:
    with running_control_plane(tmp_path) as cp:
        issuer = RemoteIssuer(cp.url, cp.token("default", "order"))
        order, reviews = SpiffeId.of("default", "order"), SpiffeId.of("default", "reviews")
        key = new_private_key()
        issued = issuer.issue(make_csr(order, key), order, 3600)
        assert issued.identity == order
        assert issued.not_after > time.time()
        with pytest.raises(
            CertificateRequestError, match=r"403: .*caller is entitled to spiffe://cluster\.local/ns/default/sa/order"
        ):
            issuer.issue(make_csr(reviews, key), reviews, 3600)
        with pytest.raises(ControlPlaneAuthError, match="401"):
            RemoteIssuer(cp.url, "mlt_wrong").issue(make_csr(order, key), order, 3600)


def test_the_agent_thread_outlives_the_loop_that_connected(tmp_path: Path, pair: tuple[Upstream, Upstream]) -> None:
    """``asyncio.run(Mesh.connect(...))`` then serving in another loop: pushes still arrive."""
    v1, v2 = pair
    with control_plane(tmp_path, routed(v1, v2, "v1")) as cp:
        mesh = connect(cp, tmp_path)  # its loop is closed now
        agent = mesh.agent
        assert agent is not None

        async def later() -> str:
            version = apply(cp, [virtual_service(HOST, {"route": [to(HOST, "v2")]})])
            await asyncio.to_thread(agent.wait_for_version, version, 2.0)
            async with mesh.async_client() as client:
                return str((await client.get(f"http://{HOST}/")).json()["version"])

        try:
            assert asyncio.run(later()) == "v2"
        finally:
            asyncio.run(mesh.aclose())
        assert agent.closed
        assert not any(t.name == f"meshlib-agent-{agent.node}" for t in threading.enumerate())


def test_agents_are_distinct_nodes(tmp_path: Path) -> None:
    a = Agent("http://127.0.0.1:1", workload=Workload("order"), token="t", cache_dir=tmp_path)
    b = Agent("http://127.0.0.1:1", workload=Workload("order"), token="t", cache_dir=tmp_path)
    assert a.node != b.node
    assert a.node.startswith(f"order.default-{os.getpid()}-")


def _server_certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: the control plane's HTTPS, and its own CA bundle."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "control-plane")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cp.crt", tmp_path / "cp.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_an_https_control_plane_is_checked_against_the_given_ca_bundle(
    tmp_path: Path, pair: tuple[Upstream, Upstream]
) -> None:
    v1, _ = pair
    cert, key = _server_certificate(tmp_path)
    with running_control_plane(tmp_path, ssl_certfile=str(cert), ssl_keyfile=str(key), keepalive=KEEPALIVE) as cp:
        url = cp.url.replace("http://", "https://")
        token = cp.run(cp.plane.create_token("default", "order"))
        cp.run(cp.plane.apply([service_entry(HOST, v1)]))

        def connect_to(verify: Any, **options: Any) -> meshlib.Mesh:
            options.setdefault("cache_dir", tmp_path / "cache")
            return asyncio.run(meshlib.Mesh.connect(url, workload="order", token=token, verify=verify, **options))

        for verify in (str(cert), ssl.create_default_context(cafile=str(cert))):
            mesh = connect_to(verify)
            try:
                assert mesh.certificates is not None  # the CA endpoint is reached over the same HTTPS
                with mesh.client() as client:
                    assert client.get(f"http://{HOST}/").json()["endpoint"] == "a"
            finally:
                mesh.close()
        # The system's trust store does not know this certificate (and the cache is not used: it is empty).
        with pytest.raises(ControlPlaneUnavailableError, match="ConnectError"):
            connect_to(True, cache_dir=tmp_path / "empty", timeout=0.5)


def test_a_control_plane_that_never_answers_is_waited_for_until_the_timeout_then_the_cache_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not refused, just silent (a hung server, a black-holed route): the timeout, not the socket, decides."""
    write_cache(tmp_path, 4, "n4", [service_entry(HOST, ("127.0.0.1:1", "v1"))])
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # connections queue in the backlog; nothing ever answers
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, "meshlib.control"):
            mesh = asyncio.run(meshlib.Mesh.connect(url, workload="order", token="t", cache_dir=tmp_path, timeout=0.5))
        try:
            assert 0.5 <= time.monotonic() - started < 2
            assert mesh.agent is not None
            assert mesh.agent.stale
            assert mesh.agent.version == 4
            assert f"control plane {url} sent no configuration in 0.5 s; serving cached configuration version 4" in (
                caplog.text
            )
        finally:
            mesh.close()
