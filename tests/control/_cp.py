"""A real control plane on a loopback port, in its own thread and loop, for data-plane tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from meshlib.control._server import ControlPlane
from meshlib.control._store import FileStore, Store
from meshlib.security import CertificateAuthority
from tests._upstreams import free_port

ADMIN_TOKEN = "mlt_admin-token-for-tests"
_CA: CertificateAuthority | None = None


def test_ca() -> CertificateAuthority:
    """One CA for the whole run: making EC keys is cheap, but the same root keeps failures readable."""
    global _CA
    if _CA is None:
        _CA = CertificateAuthority.create()
    return _CA


class RunningControlPlane:
    """``url``, ``admin_token``, ``plane`` (the ControlPlane), and the admin API as methods."""

    def __init__(self, plane: ControlPlane, port: int, **server_options: Any) -> None:
        self.plane = plane
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.admin_token = ADMIN_TOKEN
        self._options = server_options
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- serving ---------------------------------------------------------------------

    def start_serving(self) -> None:
        """Serve (again) on the same port: a control-plane restart."""
        options = {
            "host": "127.0.0.1",
            "port": self.port,
            "log_level": "error",
            "lifespan": "on",
            "timeout_graceful_shutdown": 0.5,
            **self._options,
        }
        server = uvicorn.Server(uvicorn.Config(self.plane.app, **options))
        ready = threading.Event()

        def run() -> None:
            async def main() -> None:
                self.loop = asyncio.get_running_loop()
                ready.set()
                await server.serve()

            asyncio.run(main())

        thread = threading.Thread(target=run, daemon=True, name=f"control-plane-{self.port}")
        thread.start()
        limit = time.monotonic() + 15
        while not server.started:
            if not thread.is_alive() or time.monotonic() > limit:
                raise RuntimeError("the control plane did not start")
            time.sleep(0.01)
        self._server, self._thread = server, thread

    def stop_serving(self) -> None:
        """Stop the control plane (its streams drop, its port closes)."""
        if self._server is not None and self._thread is not None:
            if self.loop is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.plane.drain)
            self._server.should_exit = True
            self._thread.join(15)
        self._server = self._thread = None

    def run(self, coro: Any) -> Any:
        """Run a coroutine on the control plane's own loop (its state is not thread-safe)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(15)

    # -- the admin API, over HTTP as a user would --------------------------------------

    def _admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {self.admin_token}"}, timeout=10)

    def token(self, namespace: str = "default", service_account: str = "order") -> str:
        with self._admin() as c:
            r = c.post("/v1/tokens", json={"namespace": namespace, "service_account": service_account})
            r.raise_for_status()
            return str(r.json()["token"])

    def apply(self, docs: Sequence[Mapping[str, Any]] | str) -> httpx.Response:
        import json

        body = docs if isinstance(docs, str) else json.dumps(list(docs))
        with self._admin() as c:
            return c.post("/v1/resources", content=body, headers={"content-type": "application/yaml"})

    def delete(self, ref: str) -> httpx.Response:
        with self._admin() as c:
            return c.delete(f"/v1/resources/{ref}")

    def get(self, path: str) -> Any:
        with self._admin() as c:
            r = c.get(path)
            r.raise_for_status()
            return r.json()

    def dataplanes(self) -> list[dict[str, Any]]:
        return list(self.get("/v1/dataplanes")["dataplanes"])

    def wait_for(self, predicate: Any, timeout: float = 5.0, what: str = "the condition") -> Any:
        limit = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > limit:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.02)


@contextlib.contextmanager
def running_control_plane(
    tmp_path: Path,
    config: Sequence[Mapping[str, Any]] = (),
    *,
    store: Store | None = None,
    port: int | None = None,
    ca: CertificateAuthority | None = None,
    registry_ttl: float = 10.0,
    keepalive: float = 10.0,
    view_token: str | None = None,
    **server_options: Any,
) -> Iterator[RunningControlPlane]:
    """A control plane (file store under ``tmp_path`` unless given) serving on a loopback port."""
    store = store if store is not None else FileStore(tmp_path / "control-plane")
    plane = ControlPlane(
        store,
        ca=ca or test_ca(),
        admin_token=ADMIN_TOKEN,
        registry_ttl=registry_ttl,
        keepalive=keepalive,
        view_token=view_token,
    )
    running = RunningControlPlane(plane, port or free_port(), **server_options)
    running.start_serving()
    try:
        if config:
            r = running.apply(config)
            assert r.status_code == 200, r.text
        yield running
    finally:
        running.stop_serving()
