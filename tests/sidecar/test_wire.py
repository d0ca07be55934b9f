"""Both listeners on the wire, driven with raw sockets: what RFC 9110/9112 ask of a proxy, and misbehaving peers.

One sidecar serves the whole module: its inbound listener forwards to a recording app,
and its outbound listener reaches the same app as the mesh host ``app`` (plus two
upstreams that die mid-body). Most tests run against both listeners. Nothing here goes
through httpx on the client side unless the test says so: the bytes are the test's own.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

import meshlib
from tests._upstreams import service_entry, serving
from tests.sidecar._sidecar import (
    DyingServer,
    RecordingApp,
    RunningSidecar,
    closed_by_peer,
    connect,
    dead_address,
    read_response,
    running_sidecar,
)

FLAGS = "x-meshlib-response-flags"


@dataclass
class Front:
    sidecar: RunningSidecar
    app: RecordingApp
    dying: DyingServer
    dying_chunked: DyingServer


@pytest.fixture(scope="module")
def front() -> Iterator[Front]:
    app = RecordingApp("app")
    dying, dying_chunked = DyingServer(), DyingServer(chunked=True)
    try:
        with serving(app) as port:
            address = f"127.0.0.1:{port}"
            mesh = meshlib.Mesh.from_resources(
                [
                    service_entry("app", (address, "v1")),
                    service_entry("dying", (dying.address, "v1")),
                    service_entry("dying-chunked", (dying_chunked.address, "v1")),
                ],
                workload="front",
            )
            with running_sidecar(mesh, app=address) as sidecar:
                yield Front(sidecar, app, dying, dying_chunked)
    finally:
        dying.close()
        dying_chunked.close()


@pytest.fixture(params=["outbound", "inbound"])
def listener(request: pytest.FixtureRequest, front: Front) -> int:
    """The port of one listener; a request with ``Host: app`` reaches the recording app through either."""
    return front.sidecar.ports[request.param]


def exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[int, bool]:
    """Send ``data`` on a new connection; the response status, and whether the sidecar then closed."""
    with connect(port, timeout) as sock:
        sock.sendall(data)
        response = read_response(sock)
        assert response is not None, "the connection closed without a response"
        return response.status, closed_by_peer(sock)


def still_serving(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(b"GET /after HTTP/1.1\r\nHost: app\r\n\r\n")
        response = read_response(sock)
    assert response is not None
    assert response.status == 200
    assert json.loads(response.body)["path"] == "/after"


# ---------------------------------------------------------------------------- malformed and oversized


@pytest.mark.parametrize(
    "data",
    [
        b"this is not http\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: app\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost app\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: app\r\nContent-Length: ten\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
    ids=["request-line", "version", "header-line", "content-length", "length-and-chunked"],
)
def test_a_malformed_request_is_400_and_the_connection_closes(front: Front, listener: int, data: bytes) -> None:
    before = len(front.app.requests)
    assert exchange(listener, data) == (400, True)
    assert len(front.app.requests) == before  # nothing reached the app
    still_serving(listener)


def test_a_100_kb_header_is_refused_with_431_and_the_sidecar_keeps_serving(front: Front, listener: int) -> None:
    before = len(front.app.requests)
    big = b"GET /big-header HTTP/1.1\r\nHost: app\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    assert exchange(listener, big) == (431, True)
    assert len(front.app.requests) == before
    still_serving(listener)


def test_a_head_that_never_ends_is_refused_once_past_the_limit(front: Front, listener: int) -> None:
    # Headers sent in pieces, never finished: refused when they pass 60 KiB, not held without bound.
    with connect(listener) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: app\r\n")
        for i in range(40):
            try:
                sock.sendall(b"X-Filler-%02d: %s\r\n" % (i, b"f" * 4000))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.002)
        response = read_response(sock)
    assert response is not None
    assert response.status == 431
    still_serving(listener)


def test_headers_under_the_limit_pass(front: Front, listener: int) -> None:
    with connect(listener) as sock:
        sock.sendall(
            b"GET /many HTTP/1.1\r\nHost: app\r\n"
            + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 400) for i in range(100))
            + b"\r\n"
        )
        response = read_response(sock)
    assert response is not None
    assert response.status == 200
    received = front.app.requests[-1]
    assert received.path == "/many"
    assert received.header("x-h99") == "v" * 400


def test_a_request_without_host_is_400_on_the_outbound_listener(front: Front) -> None:
    status, _ = exchange(front.sidecar.ports["outbound"], b"GET / HTTP/1.0\r\n\r\n")
    assert status == 400


def test_connect_tunnels_are_refused(front: Front) -> None:
    # httptools cannot parse an authority-form target, so uvicorn answers 400 before OutboundProxy's 405 could.
    status, _ = exchange(front.sidecar.ports["outbound"], b"CONNECT app:443 HTTP/1.1\r\nHost: app:443\r\n\r\n")
    assert status in (400, 405)


# ---------------------------------------------------------------------------- bodies


def test_a_chunked_request_body_streams_through_to_the_app_byte_for_byte(front: Front, listener: int) -> None:
    pieces = [b"first\r\n", bytes(range(256)), b"0\r\n\r\n looks like an end but is data", b"x" * 70_000, b"last"]
    body = b"".join(pieces)
    with connect(listener) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in pieces:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            time.sleep(0.02)
        sock.sendall(b"0\r\n\r\n")
        response = read_response(sock)
    assert response is not None
    assert response.status == 200
    answer = json.loads(response.body)
    assert answer["length"] == len(body)
    assert answer["sha256"] == hashlib.sha256(body).hexdigest()
    assert front.app.requests[-1].body == body


def test_expect_100_continue_gets_the_interim_answer_before_the_body_is_sent(front: Front, listener: int) -> None:
    body = b"hello there"
    with connect(listener) as sock:
        sock.sendall(
            b"PUT /upload HTTP/1.1\r\nHost: app\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body)
        )
        interim = read_response(sock, head_only=True)
        assert interim is not None
        assert interim.status == 100
        sock.sendall(body)
        final = read_response(sock)
    assert final is not None
    assert final.status == 200
    assert json.loads(final.body)["length"] == len(body)
    assert front.app.requests[-1].body == body


def test_hop_by_hop_request_headers_are_not_forwarded(front: Front, listener: int) -> None:
    with connect(listener) as sock:
        sock.sendall(
            b"GET /hop HTTP/1.1\r\n"
            b"Host: app\r\n"
            b"Connection: keep-alive, X-Custom\r\n"
            b"X-Custom: for the proxy only\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Authorization: Basic c2VjcmV0\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"TE: trailers\r\n"
            b"X-End-To-End: kept\r\n"
            b"\r\n"
        )
        response = read_response(sock)
    assert response is not None
    assert response.status == 200
    received = front.app.requests[-1]
    assert received.path == "/hop"
    assert received.header("x-end-to-end") == "kept"
    assert not {"x-custom", "keep-alive", "proxy-authorization", "proxy-connection", "te"} & received.names
    assert "x-custom" not in (received.header("connection") or "").lower()


def test_hop_by_hop_response_headers_are_not_relayed(front: Front, listener: int) -> None:
    with connect(listener) as sock:
        sock.sendall(b"GET /hop-by-hop HTTP/1.1\r\nHost: app\r\n\r\n")
        response = read_response(sock)
    assert response is not None
    assert response.status == 200
    assert response.header("x-app-kept") == "end to end"
    names = {name for name, _ in response.headers}
    assert not {"x-app-secret", "keep-alive", "proxy-authenticate"} & names
    assert "x-app-secret" not in (response.header("connection") or "")


# ---------------------------------------------------------------------------- slow and dying peers


def test_slowloris_clients_do_not_block_others(front: Front) -> None:
    ports = front.sidecar.ports
    stop = threading.Event()
    sent: list[int] = []

    def slowloris(port: int) -> None:
        with connect(port) as sock:
            for byte in b"GET /slow HTTP/1.1\r\nHost: app\r\nX-Slow: " + b"z" * 100:
                if stop.wait(1.0):  # one byte a second, headers never finished
                    return
                sock.sendall(bytes([byte]))
                sent.append(port)

    slow = [threading.Thread(target=slowloris, args=(ports[n],), daemon=True) for n in ("outbound", "inbound") * 5]
    for thread in slow:
        thread.start()
    time.sleep(1.2)
    worst = 0.0
    try:
        with httpx.Client(proxy=front.sidecar.proxy, timeout=5) as via_proxy, httpx.Client(timeout=5) as direct:
            for _ in range(20):
                for call in (
                    lambda: via_proxy.get("http://app/fast"),
                    lambda: direct.get(f"{front.sidecar.inbound_url}/fast"),
                ):
                    started = time.monotonic()
                    assert call().status_code == 200
                    worst = max(worst, time.monotonic() - started)
    finally:
        stop.set()
        for thread in slow:
            thread.join(5)
    assert len(sent) >= 10  # the slow clients were really at it meanwhile
    assert worst < 1.0  # each slow client holds its own connection only (they would hold it for minutes)
    assert not any(r.path == "/slow" for r in front.app.requests)


@pytest.mark.parametrize("host", ["dying", "dying-chunked"])
def test_an_upstream_dying_mid_body_gives_a_truncated_response_not_a_complete_one(front: Front, host: str) -> None:
    port = front.sidecar.ports["outbound"]
    with connect(port) as sock:
        sock.sendall(b"GET /file HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
        response = read_response(sock)
        assert response is not None
        assert closed_by_peer(sock)
    assert response.status == 200  # the status line had gone out before the upstream died
    assert not response.complete
    assert 0 < len(response.body) < 1_000_000
    with httpx.Client(proxy=front.sidecar.proxy, timeout=5) as app:
        with pytest.raises(httpx.RemoteProtocolError):
            app.get(f"http://{host}/file")
        assert app.get("http://app/").status_code == 200  # the sidecar keeps serving
    still_serving(port)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_the_app_dying_mid_body_gives_the_inbound_caller_a_truncated_response(chunked: bool) -> None:
    dying = DyingServer(chunked=chunked)
    try:
        mesh = meshlib.Mesh.from_resources([], workload="front")
        with running_sidecar(mesh, app=dying.address) as sidecar, connect(sidecar.ports["inbound"]) as sock:
            sock.sendall(b"GET /file HTTP/1.1\r\nHost: app\r\n\r\n")
            response = read_response(sock)
            assert response is not None
            assert closed_by_peer(sock)
    finally:
        dying.close()
    assert response.status == 200
    assert not response.complete
    assert dying.received == 1


def test_the_app_down_is_503_uf_at_the_inbound_listener() -> None:
    mesh = meshlib.Mesh.from_resources([], workload="front")
    with running_sidecar(mesh, app=dead_address()) as sidecar:
        response = httpx.get(f"{sidecar.inbound_url}/", timeout=5)
        again = httpx.get(f"{sidecar.inbound_url}/", timeout=5)
    assert response.status_code == again.status_code == 503
    assert response.headers[FLAGS] == "UF"
