"""A bare subscriber for control-plane tests: reads the SSE stream in a thread, ACKs or NACKs as told."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

import httpx


class Subscriber:
    """Subscribes as one workload; ``pushes`` receives every snapshot event's data, in order."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        node: str = "node-1",
        workload: str = "order",
        namespace: str = "default",
        service_account: str = "",
        labels: Mapping[str, str] | None = None,
        answer: Callable[[dict[str, Any]], str | None] = lambda push: None,
    ) -> None:
        self.url = url
        self.token = token
        self.node = node
        self.params: list[tuple[str, str]] = [("node", node), ("workload", workload), ("namespace", namespace)]
        if service_account:
            self.params.append(("service_account", service_account))
        self.params += [("label", f"{k}={v}") for k, v in (labels or {}).items()]
        self.answer = answer
        self.pushes: queue.Queue[dict[str, Any]] = queue.Queue()
        self.status_code: int | None = None
        self.error_body = ""
        self._client = httpx.Client(timeout=httpx.Timeout(10, read=30))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._opened = threading.Event()

    def __enter__(self) -> Subscriber:
        self._thread.start()
        self._opened.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def _run(self) -> None:
        headers = {"authorization": f"Bearer {self.token}"}
        try:
            with self._client.stream("GET", f"{self.url}/v1/stream", params=self.params, headers=headers) as r:
                if r.status_code != 200:
                    self.error_body = r.read().decode()
                self.status_code = r.status_code
                self._opened.set()
                if r.status_code != 200:
                    return
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    push = json.loads(line[5:])
                    error = self.answer(push)
                    self._client.post(
                        f"{self.url}/v1/ack",
                        headers=headers,
                        json={"node": self.node, "nonce": push["nonce"], "version": push["version"], "error": error},
                    )
                    self.pushes.put(push)
        except (httpx.HTTPError, RuntimeError):
            self._opened.set()

    def next_push(self, timeout: float = 5.0) -> dict[str, Any]:
        return self.pushes.get(timeout=timeout)

    def push_where(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        """The first push (waiting for more) that satisfies ``predicate``."""
        import time

        limit = time.monotonic() + timeout
        while True:
            push = self.pushes.get(timeout=max(0.01, limit - time.monotonic()))
            if predicate(push):
                return push


def kinds(push: Mapping[str, Any]) -> dict[str, list[str]]:
    """``kind -> [namespace/name]`` of a push's resources."""
    out: dict[str, list[str]] = {}
    for doc in push["resources"]:
        meta = doc["metadata"]
        out.setdefault(doc["kind"], []).append(f"{meta['namespace']}/{meta['name']}")
    return out


def endpoints(push: Mapping[str, Any], host: str) -> list[dict[str, Any]]:
    for doc in push["resources"]:
        if doc["kind"] == "ServiceEntry" and host in doc["spec"]["hosts"]:
            return list(doc["spec"].get("endpoints") or [])
    return []
