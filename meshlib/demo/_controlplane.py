"""The demo's control plane, and the admin API client the demo changes the mesh with.

The control plane is built from the same pieces as ``meshlib control-plane`` (the
embedded file store, a CA made in the state directory, a 0600 admin token file), in
a thread of its own on a free loopback port. Every change the demo makes goes
through its HTTP API, exactly as ``meshlib apply`` or a CI job would make it, and the
demo then waits for the data planes' ACKs on ``/v1/dataplanes``: what it measures
next runs on the pushed configuration, not on a guess that it has arrived.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from ..control._run import ControlPlaneOptions, _admin_token, _ca
from ..control._server import ControlPlane
from ..control._store import open_store
from ._loop import LoopThread

__all__ = ["AdminClient", "Change", "DemoControlPlane", "DemoError"]


class DemoError(Exception):
    """Something the demo needs did not happen (the message says what, for the report)."""


class DemoControlPlane:
    """``url``, ``admin_token_file`` and ``plane`` once ``start`` returned."""

    def __init__(self, state_dir: Path, *, registry_ttl: float = 10.0, keepalive: float = 10.0) -> None:
        self.state_dir = state_dir
        self.admin_token_file = state_dir / "admin-token"
        self.view_token_file = state_dir / "view-token"
        self._options = ControlPlaneOptions(state_dir=state_dir, registry_ttl=registry_ttl, keepalive=keepalive)
        self._thread = LoopThread("control-plane")
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self.plane: ControlPlane | None = None
        self.url = ""
        self.admin_token = ""
        self.view_token = ""

    async def start(self) -> None:
        self.admin_token = _admin_token(self.admin_token_file)
        self.view_token = _admin_token(self.view_token_file)
        self.url = await self._thread.run(self._start())

    async def _start(self) -> str:
        options = self._options
        store = open_store(None, options.state_dir)
        ca = await _ca(options, store)  # made in STATE_DIR/ca, as `meshlib control-plane` does
        plane = ControlPlane(
            store,
            ca=ca,
            admin_token=self.admin_token,
            registry_ttl=options.registry_ttl,
            keepalive=options.keepalive,
            view_token=self.view_token,
        )
        await plane.start()
        self.plane = plane
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            plane.app,
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
            timeout_keep_alive=75,  # data planes ACK over a kept-alive connection
        )
        self._server = uvicorn.Server(config)
        self._serving = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._serving.done():
                self._serving.result()
                raise DemoError("the control plane stopped as it started")
            await asyncio.sleep(0.01)
        return f"http://127.0.0.1:{port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard, with the read-only view token in the fragment (which browsers never send to a server)."""
        return f"{self.url}/dashboard#token={self.view_token}"

    async def stop(self) -> None:
        try:
            await self._thread.run(self._stop(), timeout=10)
        except (TimeoutError, RuntimeError):
            pass
        finally:
            self._thread.stop()

    async def _stop(self) -> None:
        if self.plane is not None:
            self.plane.drain()  # streams end first, or uvicorn would wait for them
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            await asyncio.gather(self._serving, return_exceptions=True)
        if self.plane is not None:
            await self.plane.stop()


class Change:
    """What one change through the API did: the version it made and how long the data planes took to ACK it."""

    def __init__(self, what: str, version: int, ack_seconds: float, acked_by: Sequence[str]) -> None:
        self.what = what
        self.version = version
        self.ack_seconds = ack_seconds
        self.acked_by = list(acked_by)

    def describe(self) -> str:
        counts = Counter(self.acked_by)
        who = ", ".join(f"{w} ({n} data planes)" if n > 1 else w for w, n in sorted(counts.items())) or "nobody"
        return f"{self.what} -> version {self.version}, ACKed by {who} in {self.ack_seconds * 1000:.0f} ms"

    def to_dict(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "version": self.version,
            "ack_ms": round(self.ack_seconds * 1000, 1),
            "acked_by": self.acked_by,
        }


class AdminClient:
    """The control plane's admin API (``Authorization: Bearer <admin token>``), as the demo's steps use it."""

    def __init__(self, url: str, token: str) -> None:
        self._client = httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=15.0)
        self.changes: list[Change] = []

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._client.request(method, path, **kwargs)
        if response.status_code >= 300:
            raise DemoError(f"{method} {path} answered {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else None

    async def token(self, namespace: str, service_account: str) -> str:
        data = await self._json("POST", "/v1/tokens", json={"namespace": namespace, "service_account": service_account})
        return str(data["token"])

    async def dataplanes(self) -> list[dict[str, Any]]:
        return list((await self._json("GET", "/v1/dataplanes"))["dataplanes"])

    async def registry(self) -> list[dict[str, Any]]:
        return list((await self._json("GET", "/v1/registry"))["registrations"])

    async def version(self) -> int:
        return int((await self._json("GET", "/v1/resources"))["version"])

    async def apply(self, what: str, documents: Iterable[Mapping[str, Any]], wait_for: Sequence[str]) -> Change:
        """POST /v1/resources, then wait until every data plane of the ``wait_for`` workloads ACKed it."""
        body = json.dumps(list(documents))
        data = await self._json("POST", "/v1/resources", content=body, headers={"content-type": "application/json"})
        return await self._acked(what, int(data["version"]), wait_for)

    async def delete(self, what: str, ref: str, wait_for: Sequence[str]) -> Change:
        data = await self._json("DELETE", f"/v1/resources/{ref}")
        return await self._acked(what, int(data["version"]), wait_for)

    async def rollback(self, what: str, version: int, wait_for: Sequence[str]) -> Change:
        data = await self._json("POST", "/v1/rollback", json={"version": version})
        return await self._acked(what, int(data["version"]), wait_for)

    async def _acked(self, what: str, version: int, workloads: Sequence[str], timeout: float = 15.0) -> Change:
        start = time.monotonic()
        nodes = await self.wait_acked(version, workloads, timeout)
        change = Change(what, version, time.monotonic() - start, nodes)
        self.changes.append(change)
        return change

    async def wait_acked(self, version: int, workloads: Sequence[str], timeout: float = 15.0) -> list[str]:
        """The workloads of the connected data planes once each of ``workloads``' ACKed ``version`` or later."""
        if not workloads:
            return []
        limit = time.monotonic() + timeout
        while True:
            planes = [d for d in await self.dataplanes() if d["workload"] in workloads and d["state"] != "DISCONNECTED"]
            late = [d for d in planes if (d.get("acked_version") or 0) < version or d["state"] == "NACKED"]
            missing = set(workloads) - {d["workload"] for d in planes}
            if planes and not late and not missing:
                return [str(d["workload"]) for d in planes]
            if time.monotonic() > limit:
                nacks = [f"{d['node']}: {d['last_nack']}" for d in late if d.get("last_nack")]
                raise DemoError(
                    f"version {version} was not ACKed by {', '.join(sorted(missing) or [d['node'] for d in late])} "
                    f"within {timeout:g} s" + (f" (NACKs: {'; '.join(nacks)})" if nacks else "")
                )
            await asyncio.sleep(0.02)
