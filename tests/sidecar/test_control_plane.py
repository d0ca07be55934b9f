"""A sidecar fed by the control plane: it registers the app, gets its certificate, and follows pushed changes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshlib import Mesh, Workload
from meshlib.sidecar import Sidecar
from tests._upstreams import Upstream, serving
from tests.control._cp import RunningControlPlane, running_control_plane


def echo_app(name: str) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = dict(scope["headers"])
        body = f"{name} {headers.get(b'x-forwarded-client-cert', b'-').decode()}".encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})

    return app


class SidecarThread:
    """A connected sidecar in a thread of its own (its loop is the one the servers run on)."""

    def __init__(self, cp: RunningControlPlane, workload: Workload, app_port: int, cache: Path) -> None:
        self.ready = threading.Event()
        self.sidecar: Sidecar | None = None
        self.error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        token = cp.token(workload.namespace, workload.service_account)

        async def main() -> None:
            try:
                mesh = await Mesh.connect(cp.url, workload=workload, token=token, cache_dir=cache, timeout=10)
                self.sidecar = Sidecar(
                    mesh,
                    app=f"127.0.0.1:{app_port}",
                    inbound="127.0.0.1:0",
                    outbound="127.0.0.1:0",
                    admin="127.0.0.1:0",
                    drain_timeout=2,
                )
                await self.sidecar.start()
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                self.ready.set()
                await self._stop.wait()
                await self.sidecar.stop()
                await mesh.aclose()
            except BaseException as exc:
                self.error = exc
                self.ready.set()

        self.thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self.thread.start()
        assert self.ready.wait(20), "the sidecar did not start"
        if self.error is not None:
            raise self.error

    @property
    def ports(self) -> dict[str, int]:
        assert self.sidecar is not None
        return self.sidecar.ports

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(15)


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[RunningControlPlane]:
    with running_control_plane(tmp_path, registry_ttl=2.0) as running:
        yield running


def test_two_sidecars_find_each_other_through_the_registry_and_speak_mtls(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    with serving(echo_app("payments-app")) as payments_port, serving(echo_app("order-app")) as order_port:
        payments = SidecarThread(cp, Workload("payments", labels={"version": "v1"}), payments_port, tmp_path / "p")
        order = SidecarThread(cp, Workload("order"), order_port, tmp_path / "o")
        try:
            registry = cp.wait_for(
                lambda: [r for r in cp.get("/v1/registry")["registrations"] if r["workload"] == "payments"],
                what="payments' sidecar in the registry",
            )
            assert registry[0]["port"] == payments.ports["inbound"], "the inbound port is what callers reach"
            assert registry[0]["tls"] is True
            proxy = f"http://127.0.0.1:{order.ports['outbound']}"
            with httpx.Client(proxy=proxy, timeout=5) as client:
                deadline = time.monotonic() + 5
                while True:
                    r = client.get("http://payments/")
                    if r.status_code == 200 or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                assert r.status_code == 200, r.text
                assert r.text.startswith("payments-app ")
                assert "URI=spiffe://cluster.local/ns/default/sa/order" in r.text, "mTLS carried order's identity"
            states = {d["workload"]: d["state"] for d in cp.dataplanes()}
            assert states == {"payments": "ACKED", "order": "ACKED"}
            config = httpx.get(f"http://127.0.0.1:{order.ports['admin']}/config").json()
            assert config["control_plane"]["version"] == cp.get("/healthz")["version"]
            assert "PRIVATE KEY" not in str(config)
        finally:
            order.stop()
            payments.stop()
        cp.wait_for(
            lambda: not [r for r in cp.get("/v1/registry")["registrations"] if r["workload"] == "payments"],
            what="payments deregistered on shutdown",
        )


def test_a_pushed_change_reaches_the_sidecar_without_dropping_its_connection(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    v1, v2 = Upstream("reviews-v1", version="v1").start(), Upstream("reviews-v2", version="v2").start()
    try:
        cp.apply(
            [
                {
                    "apiVersion": "networking.istio.io/v1",
                    "kind": "ServiceEntry",
                    "metadata": {"name": "reviews"},
                    "spec": {
                        "hosts": ["reviews"],
                        "location": "MESH_INTERNAL",
                        "resolution": "STATIC",
                        "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                        "endpoints": [
                            {
                                "address": "127.0.0.1",
                                "ports": {"http": int(u.address.rsplit(":", 1)[1])},
                                "labels": {"version": u.version},
                            }
                            for u in (v1, v2)
                        ],
                    },
                },
                {
                    "apiVersion": "networking.istio.io/v1",
                    "kind": "DestinationRule",
                    "metadata": {"name": "reviews"},
                    "spec": {
                        "host": "reviews",
                        "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")],
                    },
                },
                {
                    "apiVersion": "networking.istio.io/v1",
                    "kind": "VirtualService",
                    "metadata": {"name": "reviews"},
                    "spec": {
                        "hosts": ["reviews"],
                        "http": [{"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}],
                    },
                },
            ]
        )
        with serving(echo_app("order-app")) as order_port:
            order = SidecarThread(cp, Workload("order"), order_port, tmp_path / "o")
            try:
                proxy = f"http://127.0.0.1:{order.ports['outbound']}"
                with httpx.Client(proxy=proxy, timeout=5) as client:  # one kept-alive connection throughout
                    assert client.get("http://reviews/").json()["version"] == "v1"
                    cp.apply(
                        [
                            {
                                "apiVersion": "networking.istio.io/v1",
                                "kind": "VirtualService",
                                "metadata": {"name": "reviews"},
                                "spec": {
                                    "hosts": ["reviews"],
                                    "http": [{"route": [{"destination": {"host": "reviews", "subset": "v2"}}]}],
                                },
                            }
                        ]
                    )
                    start = time.monotonic()
                    seen = []
                    while time.monotonic() - start < 3:
                        r = client.get("http://reviews/")
                        assert r.status_code == 200
                        seen.append(r.json()["version"])
                        if seen[-1] == "v2":
                            break
                    assert seen[-1] == "v2"
                    assert time.monotonic() - start < 1.5
            finally:
                order.stop()
    finally:
        v1.stop()
        v2.stop()
