"""A real ``meshlib sidecar`` for tests: in a thread with its own event loop, or as the CLI in a subprocess.

``running_sidecar(mesh, app=...)`` runs ``Sidecar`` on uvloop in a background thread
(as ``tests/control/_cp.py`` runs the control plane), every listener on a free loopback
port; ``SidecarProcess`` runs ``python -m meshlib sidecar ...`` where signals, exit codes
or the proxy's own memory matter. Both expose ``ports`` and the URLs a client needs.

Also here: a small test app that records exactly what reached it, and raw-socket helpers
for the wire tests (an HTTP/1.1 response reader that tells a truncated body from a
complete one).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import uvloop

from meshlib import CertificateAuthority, Mesh, Workload
from meshlib.engine import TLS_MODE_LABEL
from meshlib.sidecar import Sidecar
from tests._upstreams import service_entry, serving

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"


# ---------------------------------------------------------------------------- the sidecar, in a thread


class RunningSidecar:
    """A started ``Sidecar`` on a loop of its own: ``ports``, ``proxy`` (for httpx), ``inbound_url``, ``admin()``."""

    def __init__(self, sidecar: Sidecar, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.sidecar = sidecar
        self.loop = loop
        self.thread = thread
        self.ports = sidecar.ports
        self.proxy = f"http://{LOOPBACK}:{self.ports['outbound']}"
        self.inbound_url = f"http://{LOOPBACK}:{self.ports['inbound']}"
        self.admin_url = f"http://{LOOPBACK}:{self.ports['admin']}"

    def client(self, **options: Any) -> httpx.Client:
        """An unchanged app's HTTP client: every request through the outbound listener as its HTTP proxy."""
        return httpx.Client(proxy=self.proxy, timeout=options.pop("timeout", 10.0), **options)

    def admin(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.admin_url}{path}", timeout=5.0)

    def run(self, coro: Any, timeout: float = 15.0) -> Any:
        """Run a coroutine on the sidecar's own loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextlib.contextmanager
def running_sidecar(
    mesh: Mesh,
    *,
    app: str | None = None,
    drain_timeout: float = 1.0,
    config_paths: Sequence[str] = (),
    reload_interval: float = 0.2,
    close_mesh: bool = True,
) -> Iterator[RunningSidecar]:
    """``Sidecar(mesh, ...)`` listening on free loopback ports, stopped (drained) and its mesh closed on exit.

    ``app`` defaults to a loopback port where nothing listens (outbound-only tests).
    """
    loop = uvloop.new_event_loop()
    sidecar = Sidecar(
        mesh,
        app=app or dead_address(),
        inbound=f"{LOOPBACK}:0",
        outbound=f"{LOOPBACK}:0",
        admin=f"{LOOPBACK}:0",
        drain_timeout=drain_timeout,
        config_paths=config_paths,
        reload_interval=reload_interval,
    )
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def start() -> None:
            try:
                await sidecar.start()
            except BaseException as exc:
                failure.append(exc)
                raise
            finally:
                started.set()

        try:
            loop.run_until_complete(start())
        except BaseException:
            return
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True, name="meshlib-test-sidecar")
    thread.start()
    if not started.wait(15) or failure:
        raise RuntimeError(f"the sidecar did not start: {failure[:1]}")
    running = RunningSidecar(sidecar, loop, thread)
    try:
        yield running
    finally:
        asyncio.run_coroutine_threadsafe(sidecar.stop(), loop).result(drain_timeout + 15)
        if close_mesh:
            asyncio.run_coroutine_threadsafe(mesh.aclose(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(15)
        loop.close()


# ---------------------------------------------------------------------------- the sidecar, as the CLI


_READY = re.compile(r"meshlib sidecar ready: outbound [\d.]+:(\d+) \(HTTP_PROXY\), inbound :(\d+) -> \S+, admin :(\d+)")


class SidecarProcess:
    """``python -m meshlib sidecar ARGS --inbound/--outbound/--admin 127.0.0.1:0``; its output is kept in ``lines``."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        command = [
            sys.executable,
            "-m",
            "meshlib",
            "sidecar",
            *args,
            "--inbound",
            f"{LOOPBACK}:0",
            "--outbound",
            f"{LOOPBACK}:0",
            "--admin",
            f"{LOOPBACK}:0",
        ]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.ports: dict[str, int] = {}
        self._reader = threading.Thread(target=self._read, daemon=True, name="sidecar-output")
        self._reader.start()
        if not self._ready.wait(30):
            self.kill()
            raise RuntimeError("the sidecar process did not start:\n" + self.output)
        self.proxy = f"http://{LOOPBACK}:{self.ports['outbound']}"
        self.inbound_url = f"http://{LOOPBACK}:{self.ports['inbound']}"
        self.admin_url = f"http://{LOOPBACK}:{self.ports['admin']}"

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            match = _READY.search(line)
            if match:
                out, inbound, admin = (int(g) for g in match.groups())
                self.ports = {"outbound": out, "inbound": inbound, "admin": admin}
                self._ready.set()
        self._ready.set()  # it exited: stop waiting

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, **options: Any) -> httpx.Client:
        return httpx.Client(proxy=self.proxy, timeout=options.pop("timeout", 10.0), **options)

    def admin(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.admin_url}{path}", timeout=5.0)

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 20.0) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)

    def memory_kb(self, field: str = "VmRSS") -> int:
        """A line of /proc/PID/status (``VmRSS`` now, ``VmHWM`` the peak), in kB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} for {self.pid}")


@contextlib.contextmanager
def sidecar_process(*args: str, env: dict[str, str] | None = None) -> Iterator[SidecarProcess]:
    process = SidecarProcess(*args, env=env)
    try:
        yield process
    finally:
        process.kill()


# ---------------------------------------------------------------------------- an app that says what reached it


@dataclass
class Received:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return ",".join(values) if values else None

    @property
    def names(self) -> set[str]:
        return {k for k, _ in self.headers}


@dataclass
class RecordingApp:
    """An ASGI app (under uvicorn on loopback) recording every request exactly as it arrived.

    ``GET /`` answers JSON naming the app and the caller's ``x-forwarded-client-cert``;
    every answer carries the body's length and sha256; ``/big?n=BYTES`` streams ``n`` bytes
    in 64 KiB chunks; ``/sleep?s=SECONDS`` waits first; ``/hop-by-hop`` answers with
    hop-by-hop headers; every answer is 200.
    """

    name: str = "app"
    requests: list[Received] = field(default_factory=list)
    in_flight: int = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        query = scope["query_string"].decode("latin-1")
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        received = Received(scope["method"], scope["path"], query, headers, body)
        self.requests.append(received)
        args = {k: v[0] for k, v in parse_qs(query).items()}
        if scope["path"] == "/sleep":
            self.in_flight += 1
            try:
                await asyncio.sleep(float(args.get("s", "1")))
            finally:
                self.in_flight -= 1
        if scope["path"] == "/hop-by-hop":  # hop-by-hop headers in the answer: a proxy must drop them
            head = [
                (b"content-length", b"2"),
                (b"connection", b"x-app-secret"),
                (b"x-app-secret", b"for the next hop only"),
                (b"keep-alive", b"timeout=5"),
                (b"proxy-authenticate", b"Basic"),
                (b"x-app-kept", b"end to end"),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": head})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        if scope["path"] == "/big":
            total = int(args.get("n", "0"))
            head = [(b"content-type", b"application/octet-stream"), (b"content-length", str(total).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": head})
            piece = b"x" * 65536
            sent = 0
            while sent < total:
                n = min(len(piece), total - sent)
                await send({"type": "http.response.body", "body": piece[:n], "more_body": True})
                sent += n
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        payload = json.dumps(
            {
                "app": self.name,
                "path": scope["path"],
                "length": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
                "xfcc": received.header("x-forwarded-client-cert"),
            }
        ).encode()
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": payload})


# ---------------------------------------------------------------------------- two workloads, two sidecars

CLIENT = Workload("productpage", labels={"app": "productpage"})
SERVER = Workload("reviews", labels={"app": "reviews"})
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/productpage"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/reviews"


def peer_authentication(mode: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": namespace},
        "spec": {"mtls": {"mode": mode}},
    }


def mesh_entry(host: str, address: str) -> dict[str, Any]:
    """A ServiceEntry for ``host`` at another sidecar's inbound ``address``, labelled for auto mTLS."""
    doc = service_entry(host, (address, "v1"))
    for endpoint in doc["spec"]["endpoints"]:
        endpoint["labels"][TLS_MODE_LABEL] = "istio"
    return doc


@dataclass
class Pair:
    """App A -> A's outbound sidecar -> (mTLS) -> B's inbound sidecar -> app B."""

    a: RunningSidecar
    b: RunningSidecar
    app: RecordingApp

    def client(self, **options: Any) -> httpx.Client:
        return self.a.client(**options)


@contextlib.contextmanager
def sidecar_pair(
    ca: CertificateAuthority, server_docs: Sequence[dict[str, Any]] = (), client_docs: Sequence[dict[str, Any]] = ()
) -> Iterator[Pair]:
    """Two sidecars with certificates from ``ca``: A (productpage) calls ``http://reviews/``, B (reviews) serves it."""
    app = RecordingApp("reviews")
    with serving(app) as app_port:
        server = Mesh.from_resources(list(server_docs), workload=SERVER, ca=ca)
        with running_sidecar(server, app=f"{LOOPBACK}:{app_port}") as b:
            docs = [mesh_entry("reviews", f"{LOOPBACK}:{b.ports['inbound']}"), *client_docs]
            client = Mesh.from_resources(docs, workload=CLIENT, ca=ca)
            with running_sidecar(client) as a:
                yield Pair(a, b, app)


# ---------------------------------------------------------------------------- raw sockets


def dead_address() -> str:
    """A loopback address where nothing listens."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return f"{LOOPBACK}:{s.getsockname()[1]}"


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool
    """False when the connection ended before the body its framing announced."""

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return ",".join(values) if values else None


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.eof = False

    def fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def until(self, marker: bytes) -> bytes | None:
        while marker not in self.buffer:
            if not self.fill():
                return None
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def exactly(self, n: int) -> tuple[bytes, bool]:
        while len(self.buffer) < n:
            if not self.fill():
                data, self.buffer = self.buffer, b""
                return data, False
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data, True


def read_response(sock: socket.socket, *, head_only: bool = False, method: str = "GET") -> RawResponse | None:
    """One HTTP/1.1 response off ``sock`` (None if the connection closed first); ``head_only`` skips the body."""
    reader = _Reader(sock)
    head = reader.until(b"\r\n\r\n")
    if head is None:
        return None
    lines = head.decode("latin-1").split("\r\n")
    _, status, *reason = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    response = RawResponse(int(status), reason[0] if reason else "", headers, b"", True)
    code = response.status
    if head_only or method == "HEAD" or 100 <= code < 200 or code in (204, 304):
        response.body = reader.buffer
        return response
    length = response.header("content-length")
    if response.header("transfer-encoding") == "chunked":
        parts = []
        while True:
            size_line = reader.until(b"\r\n")
            if size_line is None:
                response.complete = False
                break
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                response.complete = reader.until(b"\r\n") is not None
                break
            data, whole = reader.exactly(size + 2)
            parts.append(data[:size])
            if not whole:
                response.complete = False
                break
        response.body = b"".join(parts)
    elif length is not None:
        response.body, response.complete = reader.exactly(int(length))
    else:
        while reader.fill():
            pass
        response.body = reader.buffer
    return response


def closed_by_peer(sock: socket.socket, timeout: float = 3.0) -> bool:
    """True when the other side closes the connection (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def wait_for(predicate: Any, timeout: float = 5.0, what: str = "the condition", every: float = 0.02) -> Any:
    limit = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > limit:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


class DyingServer:
    """Answers every request with ``head`` and part of a body, then closes the connection: an upstream dying mid-body.

    ``chunked=False``: ``content-length: total`` then ``sent`` bytes; ``chunked=True``: chunks
    worth ``sent`` bytes and no last chunk. ``received`` counts requests.
    """

    def __init__(self, *, total: int = 1_000_000, sent: int = 100_000, chunked: bool = False) -> None:
        self.total, self.sent, self.chunked = total, sent, chunked
        self.received = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((LOOPBACK, 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True, name="dying-server")
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.received += 1
            if self.chunked:
                head = (
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                )
                piece = b"y" * 10_000
                body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(self.sent // len(piece)))
            else:
                head = b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: %d\r\n\r\n" % (
                    self.total
                )
                body = b"y" * self.sent
            conn.sendall(head + body)
            time.sleep(0.05)  # let the proxy relay what came, then die

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self._sock.close()
