"""The service being rolled out: ``reviews`` v1 (stable) and v2 (the canary), plain ASGI, no meshlib.

``rollout.py`` runs one instance of each on a free loopback port, in a thread. Every
answer is JSON naming the version, so the caller can measure the split; the canary
answers 500 to a share ``error_rate`` of its requests (from a seeded generator), which
is how the example shows a rollback.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from typing import Any

import uvicorn


class Reviews:
    """One instance: ``version``, failing with probability ``error_rate``; ``start()``, ``stop()``, ``port``."""

    def __init__(self, version: str, error_rate: float = 0.0, seed: int = 1) -> None:
        self.version = version
        self.error_rate = error_rate
        self._rng = random.Random(seed)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off", interface="asgi3"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        status = 500 if self._rng.random() < self.error_rate else 200
        body = json.dumps({"service": "reviews", "version": self.version}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def start(self) -> Reviews:
        self._thread.start()
        while not self._server.started:
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)
