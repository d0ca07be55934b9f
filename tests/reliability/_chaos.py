"""Helpers of the reliability suite: a fault-knob HTTP server, load sizes, and the figures each test reports.

``FaultServer`` is a minimal HTTP/1.1 keep-alive server on a loopback port, on an
asyncio loop in a thread of its own, written on raw sockets so its faults are the
real thing: ``fail_rate`` answers 503 to that share of requests, ``reset_rate`` closes
that share of connections with a TCP reset (SO_LINGER 0) after reading a request and
before any answer, ``delay`` waits before answering. Draws come from a seeded
generator, so a run is repeatable. ``hits`` counts requests, ``resets`` resets.

Sizes: the quick CI run uses ``N`` (2,000 requests) and a few hundred fuzz examples;
``nox -s reliability`` sets ``MESHLIB_RELIABILITY_N`` and ``MESHLIB_RELIABILITY_EXAMPLES``
for the long run. ``record`` prints a figure line and, when ``MESHLIB_RELIABILITY_FIGURES``
names a file, appends it there as JSON (the nox session collects them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

N = int(os.environ.get("MESHLIB_RELIABILITY_N", "2000"))
EXAMPLES = int(os.environ.get("MESHLIB_RELIABILITY_EXAMPLES", "100"))
FIGURES = os.environ.get("MESHLIB_RELIABILITY_FIGURES")


def record(test: str, **figures: Any) -> None:
    """Print one test's figures (visible with ``-s`` or in the nox log) and append them to the figures file."""
    line = json.dumps({"test": test, **figures}, sort_keys=True)
    print(f"FIGURES {line}")
    if FIGURES:
        with Path(FIGURES).open("a", encoding="utf-8") as f:
            f.write(line + "\n")


class FaultServer:
    """An HTTP/1.1 server with fault knobs (see the module docstring); ``address`` is ``127.0.0.1:PORT``."""

    def __init__(
        self,
        name: str,
        *,
        fail_rate: float = 0.0,
        reset_rate: float = 0.0,
        delay: float = 0.0,
        seed: int = 7,
    ) -> None:
        self.name = name
        self.fail_rate = fail_rate
        self.reset_rate = reset_rate
        self.delay = delay
        self.hits = 0
        self.resets = 0
        self.failures = 0
        self._rng = random.Random(seed)
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(512)
        self._sock.setblocking(False)
        self.port: int = self._sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True, name=f"fault-{name}")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"fault server {name} did not start")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, sock=self._sock)

        self._loop.run_until_complete(start())
        ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip() or b"0")
                if length:
                    await reader.readexactly(length)
                self.hits += 1
                if self._rng.random() < self.reset_rate:
                    self.resets += 1
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if self.delay:
                    await asyncio.sleep(self.delay)
                status, reason = (200, b"OK")
                if self._rng.random() < self.fail_rate:
                    self.failures += 1
                    status, reason = (503, b"Service Unavailable")
                body = json.dumps({"endpoint": self.name}).encode()
                writer.write(
                    b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (status, reason, len(body), body)
                )
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@contextlib.contextmanager
def fault_servers(*servers: FaultServer) -> Iterator[tuple[FaultServer, ...]]:
    try:
        yield servers
    finally:
        for server in servers:
            server.close()


def chaos_trio() -> tuple[FaultServer, FaultServer, FaultServer]:
    """The three endpoints of the chaos tests: half 503s, 10 % resets, slow (10 ms)."""
    return (
        FaultServer("failing", fail_rate=0.5, seed=1),
        FaultServer("resetting", reset_rate=0.1, seed=2),
        FaultServer("slow", delay=0.01, seed=3),
    )
