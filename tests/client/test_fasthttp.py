"""FastAsyncTransport against real servers, side by side with httpx's default transport.

The servers are uvicorn (in a thread, on a free loopback port) running a small ASGI
app, and raw sockets for misbehaviour uvicorn will not produce. Every async test
runs under pytest-asyncio's default loop and once more under uvloop
(``test_under_uvloop`` at the end of the module).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import inspect
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshlib.client._fasthttp import FastAsyncTransport

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

BIG = 5 * 1024 * 1024


def pattern(n: int) -> bytes:
    return (b"0123456789abcdef" * (n // 16 + 1))[:n]


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """/echo, /bytes/N, /chunks/K, /stream/N, /status/S, /close, /sleep/S, /slowbody/S."""
    assert scope["type"] == "http"
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = dict(scope["headers"])
    parts = scope["path"].strip("/").split("/")
    route, arg = parts[0], (parts[1] if len(parts) > 1 else "")
    base = [(b"x-client-port", str(scope["client"][1]).encode())]

    async def respond(status: int, payload: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        head = [*base, (b"content-length", str(len(payload)).encode()), *(extra or [])]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": payload})

    if route == "echo":
        await respond(
            200,
            bytes(body),
            [
                (b"x-method", scope["method"].encode()),
                (b"x-request-content-length", headers.get(b"content-length", b"-")),
                (b"x-request-transfer-encoding", headers.get(b"transfer-encoding", b"-")),
                (b"x-request-sha256", hashlib.sha256(body).hexdigest().encode()),
            ],
        )
    elif route == "bytes":
        await respond(200, pattern(int(arg)))
    elif route in ("chunks", "stream"):
        if route == "chunks":
            pieces = [b"chunk-%d;" % i for i in range(int(arg))]
        else:
            total = int(arg)
            pieces = [pattern(min(65536, total - i)) for i in range(0, total, 65536)]
        await send({"type": "http.response.start", "status": 200, "headers": base})
        for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            if route == "chunks":
                await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b""})
    elif route == "status":
        await send({"type": "http.response.start", "status": int(arg), "headers": base})
        await send({"type": "http.response.body", "body": b""})
    elif route == "close":
        await respond(200, b"bye", [(b"connection", b"close")])
    elif route == "sleep":
        await asyncio.sleep(float(arg))
        await respond(200, b"slept")
    elif route == "slowbody":
        await send({"type": "http.response.start", "status": 200, "headers": [*base, (b"content-length", b"10")]})
        await send({"type": "http.response.body", "body": b"12345", "more_body": True})
        await asyncio.sleep(float(arg))
        await send({"type": "http.response.body", "body": b"67890"})
    else:
        await respond(200, b"hello")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """A uvicorn server in a thread."""

    def __init__(self, **options: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error", lifespan="off", **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.scheme = "https" if options.get("ssl_certfile") else "http"

    def url(self, path: str = "/") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn exited"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class RawServer:
    """A listening socket whose every connection is handed to ``handle`` in a thread."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.handle = handle
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.accepted = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.conns: list[socket.socket] = []

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def __enter__(self) -> RawServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()
        for conn in self.conns:
            conn.close()


def read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            break
        data += piece
    return data


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with Server() as running:
        yield running


@pytest.fixture(scope="module")
def short_keepalive_server() -> Iterator[Server]:
    with Server(timeout_keep_alive=1) as running:
        yield running


def fast_client(**options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=FastAsyncTransport(**options))


IGNORED = {"date", "x-client-port"}


def comparable(response: httpx.Response) -> tuple[Any, ...]:
    headers = sorted((k, v) for k, v in response.headers.multi_items() if k not in IGNORED)
    return (
        response.status_code,
        response.content,
        headers,
        response.http_version,
        response.reason_phrase,
    )


async def same_as_httpx(method: str, url: str, **make: Callable[[], Any]) -> httpx.Response:
    """Send the request with both transports, assert equal answers, return the fast one's."""
    responses = []
    for client in (httpx.AsyncClient(), fast_client()):
        async with client:
            responses.append(await client.request(method, url, **{k: f() for k, f in make.items()}))
    default, fast = responses
    assert comparable(fast) == comparable(default)
    return fast


# -- requests and responses, the same as httpx's default transport ---------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH"])
async def test_methods_with_bytes_bodies(server: Server, method: str) -> None:
    content = b"" if method == "GET" else b"payload for " + method.encode()
    response = await same_as_httpx(method, server.url("/echo?a=1&b=%20x"), content=lambda: content)
    assert response.content == content
    assert response.headers["x-method"] == method


async def test_streamed_request_body_is_chunked(server: Server) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(5):
            yield b"part-%d|" % i
            await asyncio.sleep(0)

    response = await same_as_httpx("POST", server.url("/echo"), content=chunks)
    assert response.content == b"part-0|part-1|part-2|part-3|part-4|"
    assert response.headers["x-request-transfer-encoding"] == "chunked"


async def test_streamed_request_body_with_explicit_length(server: Server) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"defg"

    response = await same_as_httpx("PUT", server.url("/echo"), content=chunks, headers=lambda: {"content-length": "7"})
    assert response.content == b"abcdefg"
    assert response.headers["x-request-content-length"] == "7"
    assert response.headers["x-request-transfer-encoding"] == "-"


async def test_large_bodies_both_ways(server: Server) -> None:
    body = pattern(BIG)
    response = await same_as_httpx("POST", server.url("/echo"), content=lambda: body)
    assert response.content == body
    assert response.headers["x-request-sha256"] == hashlib.sha256(body).hexdigest()

    async def streamed() -> AsyncIterator[bytes]:
        for i in range(0, BIG, 1 << 20):
            yield body[i : i + (1 << 20)]

    response = await same_as_httpx("POST", server.url("/echo"), content=streamed)
    assert response.content == body
    assert (await same_as_httpx("GET", server.url(f"/bytes/{BIG}"))).content == body


async def test_large_streamed_response_read_incrementally(server: Server) -> None:
    size = 8 * 1024 * 1024
    async with fast_client() as client, client.stream("GET", server.url(f"/stream/{size}")) as response:
        digest = hashlib.sha256()
        received = 0
        async for chunk in response.aiter_raw():
            digest.update(chunk)
            received += len(chunk)
            if received < 1024 * 1024:
                await asyncio.sleep(0.001)  # a slow consumer: the transport must pause reading, not hoard
    assert received == size
    assert digest.hexdigest() == hashlib.sha256(pattern(65536) * (size // 65536)).hexdigest()


async def test_chunked_response(server: Server) -> None:
    response = await same_as_httpx("GET", server.url("/chunks/6"))
    assert response.content == b"chunk-0;chunk-1;chunk-2;chunk-3;chunk-4;chunk-5;"
    assert response.headers["transfer-encoding"] == "chunked"
    async with fast_client() as client, client.stream("GET", server.url("/chunks/6")) as streamed:
        pieces = [piece async for piece in streamed.aiter_raw()]
    assert len(pieces) > 1  # delivered as they arrived, not buffered to the end


async def test_head_and_bodiless_statuses(server: Server) -> None:
    head = await same_as_httpx("HEAD", server.url("/bytes/1000"))
    assert head.content == b""
    assert head.headers["content-length"] == "1000"
    for status in (204, 304):
        assert (await same_as_httpx("GET", server.url(f"/status/{status}"))).status_code == status
    async with fast_client() as client:  # the connection stays usable after a HEAD
        ports = set()
        for method in ("HEAD", "GET", "HEAD", "GET"):
            response = await client.request(method, server.url("/bytes/1000"))
            assert response.content == (b"" if method == "HEAD" else pattern(1000))
            ports.add(response.headers["x-client-port"])
        assert len(ports) == 1


# -- the connection pool ---------------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection(server: Server) -> None:
    async with fast_client() as client:
        ports = {(await client.get(server.url("/echo"))).headers["x-client-port"] for _ in range(10)}
        streamed_ports = set()
        for _ in range(3):  # bodies read through a stream also give the connection back
            async with client.stream("GET", server.url("/chunks/3")) as response:
                await response.aread()
                streamed_ports.add(response.headers["x-client-port"])
    assert len(ports) == 1
    assert streamed_ports == ports


async def test_connection_close_honoured(server: Server) -> None:
    async with fast_client() as client:
        closing = {(await client.get(server.url("/close"))).headers["x-client-port"] for _ in range(3)}
        asked = {
            (await client.get(server.url("/echo"), headers={"connection": "close"})).headers["x-client-port"]
            for _ in range(3)
        }
    assert len(closing) == 3
    assert len(asked) == 3


async def test_server_closing_idle_connection_is_transparent(short_keepalive_server: Server) -> None:
    async with fast_client() as client:
        first = await client.get(short_keepalive_server.url("/echo"))
        await asyncio.sleep(1.5)  # uvicorn closes idle connections after 1 s
        second = await client.get(short_keepalive_server.url("/echo"))
    assert first.status_code == second.status_code == 200
    assert first.headers["x-client-port"] != second.headers["x-client-port"]


async def test_idle_expiry(server: Server) -> None:
    async with fast_client(keepalive_expiry=0.2) as client:
        first = await client.get(server.url("/"))
        await asyncio.sleep(0.4)
        second = await client.get(server.url("/"))
    assert first.headers["x-client-port"] != second.headers["x-client-port"]


async def test_concurrency_bounded_per_origin(server: Server) -> None:
    async with fast_client(max_connections_per_origin=10) as client:
        responses = await asyncio.gather(*(client.get(server.url("/sleep/0.01")) for _ in range(200)))
    assert all(r.status_code == 200 and r.content == b"slept" for r in responses)
    ports = {r.headers["x-client-port"] for r in responses}
    assert 1 < len(ports) <= 10


async def test_pool_timeout(server: Server) -> None:
    async with fast_client(max_connections_per_origin=1) as client:
        held = await client.send(client.build_request("GET", server.url(f"/stream/{BIG}")), stream=True)
        with pytest.raises(httpx.PoolTimeout):
            await client.get(server.url("/"), timeout=httpx.Timeout(5.0, pool=0.2))
        await held.aclose()
        assert (await client.get(server.url("/"), timeout=httpx.Timeout(5.0, pool=0.2))).content == b"hello"


async def test_waiter_gets_the_released_connection(server: Server) -> None:
    async with fast_client(max_connections_per_origin=1) as client:
        slow = asyncio.ensure_future(client.get(server.url("/sleep/0.2")))
        await asyncio.sleep(0.05)
        fast = await client.get(server.url("/"), timeout=httpx.Timeout(5.0, pool=2.0))
        assert (await slow).headers["x-client-port"] == fast.headers["x-client-port"]


async def test_idle_connections_bounded(server: Server) -> None:
    async with fast_client(max_idle_per_origin=2) as client:
        first = await asyncio.gather(*(client.get(server.url("/sleep/0.05")) for _ in range(8)))
        second = await asyncio.gather(*(client.get(server.url("/sleep/0.05")) for _ in range(8)))
    first_ports = {r.headers["x-client-port"] for r in first}
    second_ports = {r.headers["x-client-port"] for r in second}
    assert len(first_ports) == 8
    assert len(first_ports & second_ports) == 2  # only two were kept for reuse


async def test_cancelled_request_frees_its_connection(server: Server) -> None:
    async with fast_client(max_connections_per_origin=1) as client:
        task = asyncio.ensure_future(client.get(server.url("/sleep/5")))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        response = await client.get(server.url("/"), timeout=httpx.Timeout(5.0, pool=0.5))
        assert response.content == b"hello"


async def test_early_close_of_streamed_response_drops_connection(server: Server) -> None:
    async with fast_client() as client:
        async with client.stream("GET", server.url(f"/stream/{BIG}")) as response:
            async for _ in response.aiter_raw():
                break
        after = await client.get(server.url("/"))
        again = await client.get(server.url("/"))
    assert after.headers["x-client-port"] != response.headers["x-client-port"]
    assert after.headers["x-client-port"] == again.headers["x-client-port"]


async def test_stale_reused_connection_is_retried_once() -> None:
    """The server answers one request per connection, then hangs up on the next without a byte."""

    def handle(conn: socket.socket) -> None:
        with conn:
            read_request(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            read_request(conn)  # the next request on this connection: close without answering

    with RawServer(handle) as raw:
        async with fast_client() as client:
            assert (await client.get(raw.url)).content == b"ok"
            await asyncio.sleep(0.05)
            assert (await client.put(raw.url, content=b"idempotent")).content == b"ok"
            assert raw.accepted == 2
            await asyncio.sleep(0.05)
            # A POST may have been read by the server before it hung up: never sent twice.
            with pytest.raises(httpx.RemoteProtocolError, match=r"^Server disconnected without sending a response"):
                await client.post(raw.url, content=b"not idempotent")
            assert raw.accepted == 2

            async def body() -> AsyncIterator[bytes]:
                yield b"not replayable"

            assert (await client.get(raw.url)).content == b"ok"
            await asyncio.sleep(0.05)
            with pytest.raises(httpx.RemoteProtocolError, match=r"^Server disconnected without sending a response"):
                await client.put(raw.url, content=body())


# -- errors ----------------------------------------------------------------------------------------


async def test_connect_refused() -> None:
    url = f"http://127.0.0.1:{free_port()}/"
    for client in (httpx.AsyncClient(), fast_client()):
        async with client:
            with pytest.raises(httpx.ConnectError):
                await client.get(url)


async def test_connect_timeout() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # never accepted: once the backlog is full, further SYNs are dropped
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        async with fast_client() as client:
            with pytest.raises(httpx.ConnectTimeout) as caught:
                await client.get(f"http://127.0.0.1:{port}/", timeout=httpx.Timeout(5.0, connect=0.3))
        assert caught.value.request.url.port == port
    finally:
        for sock in (listener, *fillers):
            sock.close()


async def test_read_timeouts(server: Server) -> None:
    async with fast_client() as client:
        with pytest.raises(httpx.ReadTimeout) as caught:
            await client.get(server.url("/sleep/1"), timeout=httpx.Timeout(5.0, read=0.2))
        assert caught.value.request.url.path == "/sleep/1"
        with pytest.raises(httpx.ReadTimeout):  # headers in time, the body not
            await client.get(server.url("/slowbody/1"), timeout=httpx.Timeout(5.0, read=0.2))
        assert (await client.get(server.url("/"))).content == b"hello"


async def test_write_timeout() -> None:
    stop = threading.Event()

    def never_read(conn: socket.socket) -> None:
        stop.wait(10)

    with RawServer(never_read) as raw:
        try:
            async with fast_client() as client:
                with pytest.raises(httpx.WriteTimeout):
                    await client.post(raw.url, content=b"x" * (64 * 1024 * 1024), timeout=httpx.Timeout(5.0, write=0.3))
        finally:
            stop.set()


async def test_server_closing_without_response() -> None:
    def hang_up(conn: socket.socket) -> None:
        with conn:
            read_request(conn)

    with RawServer(hang_up) as raw:
        for client in (httpx.AsyncClient(), fast_client()):
            async with client:
                with pytest.raises(httpx.RemoteProtocolError, match=r"^Server disconnected without sending a response"):
                    await client.get(raw.url)
        assert raw.accepted == 2  # a fresh connection is not retried


@pytest.mark.parametrize(
    "reply",
    [
        b"garbage that is not HTTP\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ntruncated",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ],
    ids=["garbage", "bad-length", "truncated-body", "truncated-head", "truncated-chunks"],
)
async def test_malformed_or_truncated_response(reply: bytes) -> None:
    def answer(conn: socket.socket) -> None:
        with conn:
            read_request(conn)
            conn.sendall(reply)

    with RawServer(answer) as raw:
        for client in (httpx.AsyncClient(), fast_client()):
            async with client:
                with pytest.raises(httpx.RemoteProtocolError) as caught:
                    await client.get(raw.url)
        # Bytes arrived, so the request is not safely retryable (httpcore says "without a response"
        # for a truncated head too; this transport does not).
        assert not str(caught.value).startswith("Server disconnected without sending a response")


async def test_http10_body_until_close_and_informational() -> None:
    replies = {
        "/old": b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
        "/continue": b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nConnection: close\r\n\r\ndone",
    }

    def answer(conn: socket.socket) -> None:
        with conn:
            path = read_request(conn).split(b" ")[1].decode()
            conn.sendall(replies[path])

    with RawServer(answer) as raw:
        for path in replies:
            fast = await same_as_httpx("GET", raw.url.rstrip("/") + path)
            assert fast.content in (b"until the end", b"done")
        async with fast_client() as client:
            await client.get(raw.url.rstrip("/") + "/old")
            await client.get(raw.url.rstrip("/") + "/old")
        assert raw.accepted == 6  # HTTP/1.0 without keep-alive is never reused


async def test_extra_bytes_after_response_keep_the_response_not_the_connection() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirstHTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"

    def answer(conn: socket.socket) -> None:
        with conn:
            while read_request(conn):
                conn.sendall(reply)

    with RawServer(answer) as raw:
        async with fast_client() as client:
            for _ in range(2):
                response = await client.get(raw.url)
                assert (response.status_code, response.content) == (200, b"first")
                await asyncio.sleep(0.05)
        assert raw.accepted == 2


async def test_unsupported_scheme() -> None:
    async with fast_client() as client:
        with pytest.raises(httpx.UnsupportedProtocol):
            await client.get("ftp://127.0.0.1/")


# -- TLS -------------------------------------------------------------------------------------------


def self_signed(tmp_path: Path, *, dns: str, ip: str | None) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)])
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(dns)]
    if ip:
        names.append(x509.IPAddress(ipaddress.ip_address(ip)))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / f"{dns}.crt", tmp_path / f"{dns}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


async def test_tls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, dns="localhost", ip="127.0.0.1")
    trusting = ssl.create_default_context(cafile=str(cert))
    with Server(ssl_certfile=str(cert), ssl_keyfile=str(key)) as tls:
        async with httpx.AsyncClient(verify=trusting) as default, fast_client(ssl_context=trusting) as fast:
            for path in ("/echo", "/chunks/3", f"/bytes/{BIG}"):
                a, b = (
                    await default.post(tls.url(path), content=b"secret"),
                    await fast.post(tls.url(path), content=b"secret"),
                )
                assert comparable(a) == comparable(b)
            ports = {(await fast.get(tls.url("/"))).headers["x-client-port"] for _ in range(5)}
            assert len(ports) == 1
        async with fast_client() as untrusting:  # httpx's default trust store does not know this certificate
            with pytest.raises(httpx.ConnectError):
                await untrusting.get(tls.url("/"))


async def test_tls_sni_override(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, dns="svc.mesh.local", ip=None)
    trusting = ssl.create_default_context(cafile=str(cert))
    with Server(ssl_certfile=str(cert), ssl_keyfile=str(key)) as tls:
        async with fast_client(ssl_context=trusting) as client:
            with pytest.raises(httpx.ConnectError):  # the certificate does not name 127.0.0.1
                await client.get(tls.url("/"))
            response = await client.get(tls.url("/"), extensions={"sni_hostname": "svc.mesh.local"})
            assert response.content == b"hello"


async def test_set_ssl_context_applies_to_new_connections_only(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, dns="localhost", ip="127.0.0.1")
    trusting = ssl.create_default_context(cafile=str(cert))
    with Server(ssl_certfile=str(cert), ssl_keyfile=str(key)) as tls:
        transport = FastAsyncTransport(ssl_context=trusting)
        async with httpx.AsyncClient(transport=transport) as client:
            first = await client.get(tls.url("/"))
            transport.set_ssl_context(ssl.create_default_context())  # trusts nothing of ours
            held = await client.send(client.build_request("GET", tls.url(f"/stream/{BIG}")), stream=True)
            assert held.headers["x-client-port"] == first.headers["x-client-port"]  # kept its context
            with pytest.raises(httpx.ConnectError):  # a second connection uses the new context
                await client.get(tls.url("/"))
            await held.aclose()
            transport.set_ssl_context(trusting)
            assert (await client.get(tls.url("/"))).content == b"hello"


# -- every async test again, under uvloop ---------------------------------------------------------

_ASYNC_TESTS = [f for name, f in list(globals().items()) if name.startswith("test_") and inspect.iscoroutinefunction(f)]


@pytest.mark.parametrize("scenario", _ASYNC_TESTS, ids=lambda f: f.__name__)
def test_under_uvloop(scenario: Callable[..., Coroutine[Any, Any, None]], request: pytest.FixtureRequest) -> None:
    marks = {m.name: m for m in getattr(scenario, "pytestmark", [])}
    if "parametrize" in marks:  # run each parameter in turn
        argnames, values = marks["parametrize"].args[:2]
        cases = [{argnames: v} for v in values]
    else:
        cases = [{}]
    for case in cases:
        kwargs = {
            name: case[name] if name in case else request.getfixturevalue(name)
            for name in inspect.signature(scenario).parameters
        }
        uvloop.run(scenario(**kwargs))
