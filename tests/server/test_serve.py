"""``meshlib.serve`` / ``MeshServer`` over real TLS on loopback: PeerAuthentication decides per connection.

Every server is a real ``MeshServer`` on a free port, either in a thread of its own
(so the loop can be uvloop or asyncio, as uvicorn would pick) or in the test's
event loop; every client is a real TLS client (httpx, the ``ssl`` module,
``openssl s_client``, ``curl``) holding a certificate the mesh's CA issued. The app
echoes what meshlib put in its scope.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _upstreams import free_port
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

import meshlib
from meshlib import MeshError, SecurityError
from meshlib.policy import Snapshot, SpiffeId
from meshlib.security import CertificateAuthority, IssuedCertificate, LocalIssuer, WorkloadCertificates
from meshlib.server import MeshServer, PeerInfo, peer_identity

CLIENT = SpiffeId.of("default", "client")
STRICT_BODY = "meshlib: this port requires mutual TLS (PeerAuthentication STRICT)"
LOOPS = ["asyncio", "uvloop"]


# -- the app: echoes what the scope says about the peer ------------------------------------------


class EchoApp:
    """Answers JSON naming the peer meshlib saw; counts requests and records the lifespan."""

    def __init__(self) -> None:
        self.calls = 0
        self.lifespan: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                self.lifespan.append(message["type"])
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": json.dumps(self.describe(scope))})
            await send({"type": "websocket.close"})
            return
        self.calls += 1
        digest = hashlib.sha256()
        size = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            digest.update(chunk)
            size += len(chunk)
            if not message.get("more_body"):
                break
        payload = json.dumps({**self.describe(scope), "size": size, "sha256": digest.hexdigest()}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})

    @staticmethod
    def describe(scope: dict[str, Any]) -> dict[str, Any]:
        peer = scope["extensions"]["meshlib.peer"]
        assert isinstance(peer, PeerInfo)
        identity = peer_identity(scope)
        return {
            "peer": str(identity) if identity is not None else None,
            "mtls": peer.mtls,
            "tls": scope["extensions"].get("tls"),
            "scheme": scope["scheme"],
        }


# -- resources, certificates, clients -------------------------------------------------------------


def peer_authentication(mode: str, ports: dict[int, str] | None = None, *, selector: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if selector or ports:
        spec["selector"] = {"matchLabels": {"app": "server"}}
    if ports:
        spec["portLevelMtls"] = {port: {"mode": m} for port, m in ports.items()}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "server-mtls", "namespace": "default"},
        "spec": spec,
    }


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def make_mesh(ca: CertificateAuthority | None, mode: str | None, **kwargs: Any) -> meshlib.Mesh:
    docs = [peer_authentication(mode, **kwargs)] if mode else []
    return meshlib.Mesh.from_resources(docs, workload=meshlib.Workload("server"), ca=ca)


@dataclasses.dataclass
class ClientFiles:
    cert: Path
    key: Path
    root: Path
    issued: IssuedCertificate

    def context(self, *, with_cert: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.root))
        context.check_hostname = False  # the server proves a SPIFFE id, not a DNS name
        if with_cert:
            context.load_cert_chain(str(self.cert), str(self.key))
        return context


def write_client(
    folder: Path, key: PrivateKeyTypes, issued: IssuedCertificate, server_root: bytes, name: str = "client"
) -> ClientFiles:
    folder.mkdir(parents=True, exist_ok=True)
    files = ClientFiles(folder / f"{name}-cert.pem", folder / f"{name}-key.pem", folder / "root.pem", issued)
    clear = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    files.key.touch(mode=0o600)
    files.key.write_bytes(clear)
    files.cert.write_bytes(issued.chain_pem)
    files.root.write_bytes(server_root)
    return files


@pytest.fixture
def client(ca: CertificateAuthority, tmp_path: Path) -> ClientFiles:
    key, issued = ca.issue(CLIENT)
    return write_client(tmp_path, key, issued, ca.bundle_pem)


@contextlib.contextmanager
def running(
    app: Any, mesh: meshlib.Mesh, *, loop: str = "asyncio", port: int = 0, **options: Any
) -> Iterator[MeshServer]:
    """A MeshServer in a thread of its own, on ``loop``, until the block ends."""
    server = MeshServer(app, mesh=mesh, port=port, loop=loop, log_level="warning", **options)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            server.run()
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run, name="mesh-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if failed:
            raise failed[0]
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(10)
        mesh.close()


async def get(url: str, verify: ssl.SSLContext | bool = True, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(verify=verify, timeout=10) as http:
        return await http.get(url, **kwargs)


async def refused(url: str, context: ssl.SSLContext) -> str:
    """Call ``url`` expecting the TLS handshake to be refused; the error's text (the server's alert, if any).

    With TLS 1.3 the client's side of the handshake is over before the server has
    checked its certificate, so the server's alert arrives on the first read, where
    httpx lets ``ssl.SSLError`` through unmapped.
    """
    with pytest.raises((httpx.TransportError, ssl.SSLError)) as info:
        await get(url, verify=context)
    return str(info.value)


def https(server: MeshServer, path: str = "/") -> str:
    return f"https://127.0.0.1:{server.port}{path}"


def http(server: MeshServer, path: str = "/") -> str:
    return f"http://127.0.0.1:{server.port}{path}"


# -- STRICT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
async def test_strict_mtls_reaches_the_app_with_the_callers_spiffe_id(
    loop: str, ca: CertificateAuthority, client: ClientFiles
) -> None:
    app = EchoApp()
    mesh = make_mesh(ca, "STRICT")
    assert mesh.certificates is not None
    with running(app, mesh, loop=loop) as server:
        response = await get(https(server), verify=client.context())
    assert response.status_code == 200
    seen = response.json()
    assert seen["peer"] == "spiffe://cluster.local/ns/default/sa/client"
    assert seen["mtls"] is True
    assert seen["scheme"] == "https"
    tls = seen["tls"]
    assert tls["tls_version"] in (0x0303, 0x0304)
    assert tls["client_cert_error"] is None
    assert tls["cipher_suite"] is None
    assert tls["client_cert_name"] == ""  # workload certificates carry their identity in the SAN only
    assert len(tls["client_cert_chain"]) == 1
    assert _der(tls["client_cert_chain"][0]) == _der(client.issued.leaf_pem.decode())
    assert _der(tls["server_cert"]) == _der(mesh.certificates.issued.leaf_pem.decode())


def _der(pem: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem)


async def test_strict_answers_plaintext_with_a_clear_400(
    ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    app = EchoApp()
    with caplog.at_level(logging.WARNING, logger="meshlib.server"), running(app, make_mesh(ca, "STRICT")) as server:
        response = await get(http(server))
    assert response.status_code == 400
    assert response.text == STRICT_BODY
    assert response.headers["connection"] == "close"
    assert app.calls == 0
    assert any("plaintext" in r.getMessage() and "STRICT" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("loop", LOOPS)
async def test_strict_refuses_tls_without_a_client_certificate(
    loop: str, ca: CertificateAuthority, client: ClientFiles, caplog: pytest.LogCaptureFixture
) -> None:
    app = EchoApp()
    mesh = make_mesh(ca, "STRICT")
    with caplog.at_level(logging.WARNING, logger="meshlib.server"), running(app, mesh, loop=loop) as server:
        assert "CERTIFICATE_REQUIRED" in await refused(https(server), client.context(with_cert=False))
        # the same server still serves a client that has one
        assert (await get(https(server), verify=client.context())).status_code == 200
    assert app.calls == 1
    assert any("PEER_DID_NOT_RETURN_A_CERTIFICATE" in r.getMessage() for r in caplog.records)


async def test_strict_refuses_a_certificate_from_another_ca(ca: CertificateAuthority, tmp_path: Path) -> None:
    stranger = CertificateAuthority.create()  # same trust domain, different root
    key, issued = stranger.issue(CLIENT)
    files = write_client(tmp_path, key, issued, ca.bundle_pem)
    app = EchoApp()
    with running(app, make_mesh(ca, "STRICT")) as server:
        assert "UNKNOWN_CA" in await refused(https(server), files.context())
    assert app.calls == 0


async def test_strict_refuses_an_expired_certificate(ca: CertificateAuthority, tmp_path: Path) -> None:
    key, issued = ca.issue(CLIENT, now=time.time() - 7200, ttl=3600)
    assert issued.not_after < time.time()
    files = write_client(tmp_path, key, issued, ca.bundle_pem)
    app = EchoApp()
    with running(app, make_mesh(ca, "STRICT")) as server:
        assert "CERTIFICATE_EXPIRED" in await refused(https(server), files.context())
    assert app.calls == 0


@dataclasses.dataclass(frozen=True)
class TrustingBothRoots:
    """An issuer whose bundle also trusts another CA's root: the chain of a foreign client then verifies."""

    ca: CertificateAuthority
    other: CertificateAuthority

    def issue(self, csr_pem: bytes, identity: SpiffeId, ttl: float) -> IssuedCertificate:
        issued = LocalIssuer(self.ca).issue(csr_pem, identity, ttl)
        return dataclasses.replace(issued, bundle_pem=self.ca.bundle_pem + self.other.bundle_pem)


async def test_strict_refuses_a_trusted_chain_from_another_trust_domain(
    ca: CertificateAuthority, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    evil = CertificateAuthority.create("evil.local")
    certificates = WorkloadCertificates(SpiffeId.of("default", "server"), TrustingBothRoots(ca, evil))
    assert evil.bundle_pem in certificates.issued.bundle_pem  # the foreign root IS trusted
    snapshot = Snapshot.from_resources([peer_authentication("STRICT")])
    mesh = meshlib.Mesh(snapshot, meshlib.Workload("server"), certificates=certificates)
    key, issued = evil.issue(SpiffeId.of("default", "client", "evil.local"))
    foreign = write_client(tmp_path / "evil", key, issued, ca.bundle_pem)
    key, issued = ca.issue(CLIENT)
    ours = write_client(tmp_path / "ours", key, issued, ca.bundle_pem)
    app = EchoApp()
    with caplog.at_level(logging.WARNING, logger="meshlib.security"), running(app, mesh) as server:
        await refused(https(server), foreign.context())
        assert (await get(https(server), verify=ours.context())).json()["peer"] == str(CLIENT)
    assert app.calls == 1
    assert any("evil.local" in r.getMessage() for r in caplog.records)


# -- PERMISSIVE, DISABLE, ports, changes ----------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("implementation", ["httptools", "h11"])
async def test_permissive_serves_tls_and_plaintext_on_one_port(
    loop: str, implementation: str, ca: CertificateAuthority, client: ClientFiles
) -> None:
    app = EchoApp()
    with running(app, make_mesh(ca, "PERMISSIVE"), loop=loop, http=implementation) as server:
        secure = await get(https(server), verify=client.context())
        plain = await get(http(server))
    assert secure.json()["peer"] == str(CLIENT)
    assert secure.json()["mtls"] is True
    assert plain.json() == {**plain.json(), "peer": None, "mtls": False, "tls": None, "scheme": "http"}


async def test_permissive_is_the_default_without_peer_authentication(
    ca: CertificateAuthority, client: ClientFiles
) -> None:
    with running(EchoApp(), make_mesh(ca, None)) as server:
        assert (await get(https(server), verify=client.context())).json()["peer"] == str(CLIENT)
        assert (await get(http(server))).json()["peer"] is None


@pytest.mark.parametrize("loop", LOOPS)
async def test_large_bodies_and_keep_alive_over_the_sniffed_paths(
    loop: str, ca: CertificateAuthority, client: ClientFiles
) -> None:
    body = bytes(range(256)) * 8192  # 2 MiB: many TLS records and reads after the handover
    expected = hashlib.sha256(body).hexdigest()
    with running(EchoApp(), make_mesh(ca, "PERMISSIVE"), loop=loop) as server:
        for url, verify in ((https(server), client.context()), (http(server), True)):
            async with httpx.AsyncClient(verify=verify, timeout=10) as session:
                for _ in range(3):  # one connection, reused
                    seen = (await session.post(url, content=body)).json()
                    assert (seen["size"], seen["sha256"]) == (len(body), expected)


async def test_plaintext_split_into_small_reads_is_replayed_whole(ca: CertificateAuthority) -> None:
    with running(EchoApp(), make_mesh(ca, "PERMISSIVE")) as server:
        reply = await asyncio.to_thread(_raw_request, server.port, [b"G", b"ET / HTTP/1.1\r\nhost: x\r\n", b"\r\n"])
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b'"peer": null' in reply


def _raw_request(port: int, pieces: list[bytes]) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.05)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("loop", LOOPS)
async def test_disable_serves_plaintext_and_a_tls_client_fails(
    loop: str, ca: CertificateAuthority, client: ClientFiles
) -> None:
    app = EchoApp()
    with running(app, make_mesh(ca, "DISABLE"), loop=loop) as server:
        assert (await get(http(server))).json()["peer"] is None
        await refused(https(server), client.context())  # uvicorn reads the ClientHello as a bad request
    assert app.calls == 1


@pytest.mark.parametrize(("workload_mode", "port_mode"), [("PERMISSIVE", "STRICT"), ("STRICT", "PERMISSIVE")])
async def test_port_level_mtls_overrides_the_workload_mode(
    workload_mode: str, port_mode: str, ca: CertificateAuthority, client: ClientFiles
) -> None:
    port = free_port()
    mesh = make_mesh(ca, workload_mode, ports={port: port_mode})
    assert mesh.snapshot.mtls(meshlib.Workload("server")).mode_for(port) == port_mode
    with running(EchoApp(), mesh, port=port) as server:
        assert server.port == port
        plain = await get(http(server))
        secure = await get(https(server), verify=client.context())
    assert secure.json()["peer"] == str(CLIENT)
    if port_mode == "STRICT":
        assert (plain.status_code, plain.text) == (400, STRICT_BODY)
    else:
        assert plain.json()["peer"] is None


async def test_a_mode_change_applies_to_the_next_connection(ca: CertificateAuthority) -> None:
    """In the test's own loop: PERMISSIVE → STRICT; an open connection keeps the mode it was accepted with."""
    mesh = make_mesh(ca, "PERMISSIVE")
    app = EchoApp()
    server = MeshServer(app, mesh=mesh, port=0, log_level="warning")
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), task
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(timeout=10) as kept:
            assert (await kept.get(http(server))).status_code == 200
            mesh.update([peer_authentication("STRICT")])
            fresh = await get(http(server))
            assert (fresh.status_code, fresh.text) == (400, STRICT_BODY)
            assert (await kept.get(http(server))).status_code == 200  # accepted while PERMISSIVE
            mesh.update([peer_authentication("PERMISSIVE")])
            assert (await get(http(server))).status_code == 200
    finally:
        server.should_exit = True
        await task
        mesh.close()
    assert app.lifespan == ["lifespan.startup", "lifespan.shutdown"]


async def test_a_renewed_certificate_serves_the_next_connection(ca: CertificateAuthority, client: ClientFiles) -> None:
    mesh = make_mesh(ca, "STRICT")
    assert mesh.certificates is not None
    with running(EchoApp(), mesh) as server:
        before = (await get(https(server), verify=client.context())).json()["tls"]["server_cert"]
        renewed = mesh.certificates.renew()
        after = (await get(https(server), verify=client.context())).json()["tls"]["server_cert"]
    assert before != after
    assert _der(after) == _der(renewed.leaf_pem.decode())


# -- without certificates, idle connections, options ----------------------------------------------


async def test_strict_without_a_certificate_refuses_to_start() -> None:
    mesh = make_mesh(None, "STRICT")
    server = MeshServer(EchoApp(), mesh=mesh, port=0)
    with pytest.raises(SecurityError) as info:
        await server.serve()
    assert "requires mutual TLS (PeerAuthentication/default/server-mtls: STRICT)" in str(info.value)
    assert "no workload certificate" in str(info.value)
    assert not server.started


async def test_permissive_without_a_certificate_serves_plaintext_and_closes_tls(
    ca: CertificateAuthority, client: ClientFiles, caplog: pytest.LogCaptureFixture
) -> None:
    app = EchoApp()
    with caplog.at_level(logging.ERROR, logger="meshlib.server"), running(app, make_mesh(None, "PERMISSIVE")) as server:
        assert (await get(http(server))).json()["peer"] is None
        await refused(https(server), client.context())
    assert app.calls == 1
    assert any("no workload certificate" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("loop", LOOPS)
async def test_a_connection_that_says_nothing_is_closed(loop: str, ca: CertificateAuthority) -> None:
    with running(EchoApp(), make_mesh(ca, "PERMISSIVE"), loop=loop, handshake_timeout=0.3) as server:
        started = time.monotonic()
        reply = await asyncio.to_thread(_silent, server.port)
    assert reply == b""
    assert time.monotonic() - started < 3


def _silent(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        return sock.recv(1)


def test_uvicorn_tls_options_are_refused(ca: CertificateAuthority) -> None:
    mesh = make_mesh(ca, "STRICT")
    try:
        with pytest.raises(SecurityError, match="ssl_certfile"):
            MeshServer(EchoApp(), mesh=mesh, ssl_certfile="server.pem")
        with pytest.raises(ValueError, match="one process"):
            MeshServer(EchoApp(), mesh=mesh, workers=4)
    finally:
        mesh.close()


def test_a_mesh_without_a_workload_cannot_serve() -> None:
    mesh = meshlib.Mesh.from_resources([])
    with pytest.raises(MeshError, match="workload"):
        MeshServer(EchoApp(), mesh=mesh)


def test_peer_identity_outside_meshlib_is_none() -> None:
    assert peer_identity({"type": "http"}) is None
    assert peer_identity({"type": "http", "extensions": {}}) is None
    scope = {"type": "http", "extensions": {"meshlib.peer": PeerInfo(CLIENT, mtls=True)}}
    assert peer_identity(scope) == CLIENT


# -- lifespan and websockets ----------------------------------------------------------------------


def test_lifespan_runs_untouched(ca: CertificateAuthority) -> None:
    app = EchoApp()
    with running(app, make_mesh(ca, "STRICT"), lifespan="on"):
        assert app.lifespan == ["lifespan.startup"]
    assert app.lifespan == ["lifespan.startup", "lifespan.shutdown"]


async def test_websocket_scopes_carry_the_peer(ca: CertificateAuthority, client: ClientFiles) -> None:
    websockets = pytest.importorskip("websockets.asyncio.client")
    with running(EchoApp(), make_mesh(ca, "PERMISSIVE")) as server:
        async with websockets.connect(f"wss://127.0.0.1:{server.port}/ws", ssl=client.context()) as ws:
            secure = json.loads(await ws.recv())
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            plain = json.loads(await ws.recv())
    assert (secure["peer"], secure["mtls"], secure["scheme"]) == (str(CLIENT), True, "wss")
    assert secure["tls"]["client_cert_chain"]
    assert (plain["peer"], plain["mtls"], plain["tls"]) == (None, False, None)


# -- real tools -----------------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def _run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, input=stdin, capture_output=True, timeout=20, check=False)


REQUEST = b"GET / HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n"


async def test_openssl_s_client_with_and_without_a_certificate(ca: CertificateAuthority, client: ClientFiles) -> None:
    openssl = _tool("openssl")
    with running(EchoApp(), make_mesh(ca, "STRICT")) as server:
        target = f"127.0.0.1:{server.port}"
        common = (openssl, "s_client", "-connect", target, "-CAfile", str(client.root), "-ign_eof")
        good = await asyncio.to_thread(_run, *common, "-cert", str(client.cert), "-key", str(client.key), stdin=REQUEST)
        bad = await asyncio.to_thread(_run, *common, stdin=REQUEST)
    assert good.returncode == 0, good.stderr
    assert b"Verify return code: 0 (ok)" in good.stdout
    assert b"HTTP/1.1 200 OK" in good.stdout
    assert str(CLIENT).encode() in good.stdout
    assert b"HTTP/1.1 200" not in bad.stdout
    assert b"certificate required" in bad.stderr  # the server's TLS alert, not a bare reset


async def test_curl_with_and_without_a_certificate(ca: CertificateAuthority, client: ClientFiles) -> None:
    curl = _tool("curl")
    with running(EchoApp(), make_mesh(ca, "STRICT")) as server:
        url = https(server)
        common = (curl, "--silent", "--show-error", "--max-time", "10", "--cacert", str(client.root), "-k")
        good = await asyncio.to_thread(_run, *common, "--cert", str(client.cert), "--key", str(client.key), url)
        bad = await asyncio.to_thread(_run, *common, url)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["peer"] == str(CLIENT)
    assert bad.returncode != 0
    assert bad.stdout == b""
    assert b"alert certificate required" in bad.stderr
