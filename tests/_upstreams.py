"""Real loopback upstreams for behaviour tests: uvicorn apps with knobs, and raw misbehaving sockets.

Each ``Upstream`` is a uvicorn server on a free 127.0.0.1 port, in its own thread,
answering JSON that names the endpoint (so a test sees which endpoint and subset
served it). Its ``mode`` can be switched while it runs: ``ok``, ``fail`` (answer
``status``), ``flaky`` (fail one request in ``every``), ``slow`` (wait ``delay``),
``reset`` (start a response and drop the connection), ``chance`` (fail each request
with probability ``rate``, from a seeded generator). ``headers`` are added to every
response (``Retry-After`` on a failure, say); ``requests`` records what each request
carried and when it arrived (``time``, on the monotonic clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Upstream:
    name: str
    version: str = "v1"
    mode: str = "ok"
    status: int = 503
    every: int = 2
    delay: float = 0.0
    rate: float = 0.5
    headers: list[tuple[str, str]] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    mesh: Any = None
    """A ``meshlib.Mesh``: serve with ``meshlib.MeshServer`` (its PeerAuthentication, its certificate)."""
    hits: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    _rng: random.Random = field(default_factory=lambda: random.Random(7))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        arrived = time.monotonic()
        self.hits += 1
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.requests.append(
            {
                "method": scope["method"],
                "path": scope["path"],
                "query": scope["query_string"].decode(),
                "headers": headers,
                "body": body.decode("latin-1"),
                "time": arrived,
            }
        )
        status = 200
        if self.mode == "slow":
            await self._sleep(self.delay)
        elif (
            self.mode == "fail"
            or (self.mode == "flaky" and self.hits % self.every == 0)
            or (self.mode == "chance" and self._rng.random() < self.rate)
        ):
            status = self.status
        elif self.mode == "reset":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
            raise RuntimeError("reset on purpose")
        peer = scope.get("extensions", {}).get("meshlib.peer")
        payload = json.dumps(
            {
                "endpoint": self.name,
                "version": self.version,
                "path": scope["path"],
                "host": headers.get("host", ""),
                "peer": str(peer.spiffe_id) if peer is not None and peer.spiffe_id else None,
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    *((k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but give up when the server is stopping (so ``stop`` never waits out a slow request)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self._server is not None and self._server.should_exit:
                return
            await asyncio.sleep(min(0.01, max(0.0, end - time.monotonic())))

    def start(self) -> Upstream:
        if self.mesh is not None:
            from meshlib import MeshServer

            self._server = MeshServer(
                self.app,
                mesh=self.mesh,
                host="127.0.0.1",
                port=self.port,
                log_level="error",
                lifespan="on",
                interface="asgi3",
            )
        else:
            config = uvicorn.Config(
                self.app, host="127.0.0.1", port=self.port, log_level="error", lifespan="on", interface="asgi3"
            )
            self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"upstream-{self.name}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"upstream {self.name} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


@contextlib.contextmanager
def serving(
    app: Any, *, mesh: Any = None, port: int | None = None, lifespan: str = "off", **options: Any
) -> Iterator[int]:
    """``app`` on a loopback port (free unless given) in a thread: uvicorn, or ``MeshServer`` (mTLS) with a mesh."""
    port = port or free_port()
    options = {"host": "127.0.0.1", "port": port, "log_level": "error", "lifespan": lifespan, **options}
    server: uvicorn.Server
    if mesh is not None:
        from meshlib import MeshServer

        server = MeshServer(app, mesh=mesh, **options)
    else:
        server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    limit = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > limit:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def upstreams(*specs: Upstream) -> Iterator[tuple[Upstream, ...]]:
    started: list[Upstream] = []
    try:
        for spec in specs:
            started.append(spec.start())
        yield tuple(started)
    finally:
        for u in started:
            u.stop()


def _serve_forever(spec: Upstream, ready: Any) -> None:
    spec.start()
    ready.set()
    while True:
        time.sleep(3600)


@contextlib.contextmanager
def upstream_processes(*specs: Upstream) -> Iterator[tuple[Upstream, ...]]:
    """The same upstreams, each in a process of its own, for tests that send thousands of requests.

    A server in the test's own process competes with the client for the GIL; in a
    process of its own it runs beside it. The mode is fixed when it starts, and
    ``hits`` and ``requests`` stay in the child: read what the responses say.
    """
    context = multiprocessing.get_context("spawn")
    processes: list[Any] = []
    try:
        events = []
        for spec in specs:
            ready = context.Event()
            process = context.Process(target=_serve_forever, args=(spec, ready), name=f"upstream-{spec.name}")
            process.daemon = True
            process.start()
            processes.append(process)
            events.append(ready)
        for spec, ready in zip(specs, events, strict=True):
            if not ready.wait(30):
                raise RuntimeError(f"upstream {spec.name} did not start")
        yield specs
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(10)


class ResetServer:
    """Accepts, reads a request, and closes with a TCP reset before any response.

    With ``answer_first=n`` each connection first answers ``n`` requests with a
    keep-alive ``200`` (so the client pools it) and resets on the next one: the
    reset then hits a request sent on a reused connection. ``accepted`` counts
    connections, ``received`` requests.
    """

    def __init__(self, answer_first: int = 0) -> None:
        self.answer_first = answer_first
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self.accepted = 0
        self.received = 0
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self.accepted += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(2)
            for _ in range(self.answer_first):
                if not conn.recv(65536):
                    return
                with self._lock:
                    self.received += 1
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            if conn.recv(65536):
                with self._lock:
                    self.received += 1
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=5)
        self._sock.close()


def service_entry(
    host: str, *eps: Upstream | ResetServer | tuple[str, str], namespace: str = "default"
) -> dict[str, Any]:
    """A ServiceEntry for ``host`` whose endpoints are the given loopback servers (labelled by version)."""
    endpoints = []
    for ep in eps:
        if isinstance(ep, tuple):
            address, version = ep
        else:
            address, version = ep.address, getattr(ep, "version", "v1")
        ip, port = address.rsplit(":", 1)
        endpoints.append({"address": ip, "ports": {"http": int(port)}, "labels": {"version": version}})
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": host, "namespace": namespace},
        "spec": {
            "hosts": [host],
            "location": "MESH_INTERNAL",
            "resolution": "STATIC",
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
            "endpoints": endpoints,
        },
    }


def dead_address() -> str:
    """A loopback address where nothing listens: connecting fails at once (connection refused)."""
    return f"127.0.0.1:{free_port()}"


def virtual_service(
    host: str, *http: dict[str, Any], name: str | None = None, namespace: str = "default"
) -> dict[str, Any]:
    """A VirtualService for ``host`` with the given ``http`` rules, as YAML would give it."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name or host, "namespace": namespace},
        "spec": {"hosts": [host], "http": list(http)},
    }


def destination_rule(
    host: str,
    subsets: tuple[str, ...] = ("v1", "v2", "v3"),
    traffic_policy: dict[str, Any] | None = None,
    *,
    namespace: str = "default",
) -> dict[str, Any]:
    """A DestinationRule for ``host``: one subset per version label, and an optional top-level policy."""
    spec: dict[str, Any] = {"host": host, "subsets": [{"name": v, "labels": {"version": v}} for v in subsets]}
    if traffic_policy is not None:
        spec["trafficPolicy"] = traffic_policy
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": host, "namespace": namespace},
        "spec": spec,
    }


def to(host: str, subset: str | None = None, weight: int | None = None) -> dict[str, Any]:
    """One ``route`` entry of an http rule."""
    destination: dict[str, Any] = {"host": host}
    if subset is not None:
        destination["subset"] = subset
    entry: dict[str, Any] = {"destination": destination}
    if weight is not None:
        entry["weight"] = weight
    return entry


class _Counts:
    """Attempts per destination port, as the mesh sent them (connections that were refused included)."""

    def __init__(self) -> None:
        self.by_port: dict[int, int] = {}
        self._lock = threading.Lock()

    def count(self, request: Any) -> None:
        port = request.url.port or 80
        with self._lock:
            self.by_port[port] = self.by_port.get(port, 0) + 1

    def to(self, address: str) -> int:
        return self.by_port.get(int(address.rsplit(":", 1)[1]), 0)


class CountingAsyncTransport(httpx.AsyncHTTPTransport):
    """httpx's own async transport, counting every attempt by port (use as the mesh's ``inner``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = _Counts()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.counts.count(request)
        return await super().handle_async_request(request)


class CountingTransport(httpx.HTTPTransport):
    """The sync twin of :class:`CountingAsyncTransport`."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = _Counts()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.counts.count(request)
        return super().handle_request(request)
