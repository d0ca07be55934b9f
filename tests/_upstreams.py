"""Real loopback upstreams for behaviour tests: uvicorn apps with knobs, and raw misbehaving sockets.

Each ``Upstream`` is a uvicorn server on a free 127.0.0.1 port, in its own thread,
answering JSON that names the endpoint (so a test sees which endpoint and subset
served it). Its ``mode`` can be switched while it runs: ``ok``, ``fail`` (answer
``status``), ``flaky`` (fail one request in ``every``), ``slow`` (wait ``delay``),
``reset`` (start a response and drop the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

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
    port: int = field(default_factory=free_port)
    hits: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

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
        self.hits += 1
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.requests.append(
            {
                "method": scope["method"],
                "path": scope["path"],
                "query": scope["query_string"].decode(),
                "headers": headers,
                "body": body.decode("latin-1"),
            }
        )
        status = 200
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        elif self.mode == "fail" or (self.mode == "flaky" and self.hits % self.every == 0):
            status = self.status
        elif self.mode == "reset":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
            raise RuntimeError("reset on purpose")
        payload = json.dumps(
            {"endpoint": self.name, "version": self.version, "path": scope["path"], "host": headers.get("host", "")}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    def start(self) -> Upstream:
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
def upstreams(*specs: Upstream) -> Iterator[tuple[Upstream, ...]]:
    started: list[Upstream] = []
    try:
        for spec in specs:
            started.append(spec.start())
        yield tuple(started)
    finally:
        for u in started:
            u.stop()


class ResetServer:
    """Accepts, reads the request, and closes with a TCP reset before any response."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self.accepted = 0
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
            self.accepted += 1
            with contextlib.suppress(OSError):
                conn.settimeout(1)
                conn.recv(65536)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()

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
