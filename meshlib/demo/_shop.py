"""The live demo shop: a control plane, six in-process workload instances and one app behind the sidecar.

::

    frontend ──► orders ──► payments  v1 (a), v1 (b: the one that will fail), v2
    (client)   (server)  └► ledger    plain ASGI app, own process, behind `meshlib sidecar`

    ledger-in-process: the same ledger app served in-process, for the latency table only

Everything joins the mesh the way a real deployment would: a bootstrap token from the
control plane's API, ``Mesh.connect`` (or ``meshlib sidecar --control-plane``), a
certificate from the control plane's CA, and a registration in its registry once the
server listens on a free loopback port. Nothing is configured with an address.

The in-process servers share one event loop in a thread of their own (as separate
pods would not share the driver's); the ledger app and its sidecar are child
processes (see ``_processes``). ``stop`` undoes all of it, each part bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..mesh import Mesh
from ..policy import Workload
from ..server import MeshMiddleware, MeshServer
from . import _ledger_app
from ._apps import OrdersApp, PaymentsApp
from ._controlplane import AdminClient, DemoControlPlane, DemoError
from ._loop import LoopThread
from ._processes import Child, Children
from ._resources import NAMESPACE, base

__all__ = ["InProcess", "Shop"]

_QUIET: dict[str, Any] = {"log_level": "warning", "log_config": None, "access_log": False, "lifespan": "off"}
_STARTUP_TIMEOUT = 45.0


@dataclass
class InProcess:
    """One in-process workload instance: its mesh, and its server if it serves."""

    name: str
    workload: str
    version: str
    mesh: Mesh
    app: Any = None
    server: MeshServer | None = None
    service_host: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def port(self) -> int | None:
        return self.server.port if self.server is not None else None


@dataclass
class SidecarPorts:
    inbound: int
    outbound: int
    admin: int


class Shop:
    """``await start()``, then the steps use its parts; ``await stop()`` in a ``finally``."""

    def __init__(self, workdir: Path, children: Children) -> None:
        self.workdir = workdir
        self.children = children
        self.cp = DemoControlPlane(workdir / "control-plane")
        self.admin: AdminClient | None = None
        self.base_version = 0
        self.loop = LoopThread("shop")
        self.instances: dict[str, InProcess] = {}
        self.ledger_app: Child | None = None
        self.ledger_port = 0
        self.sidecar: Child | None = None
        self.sidecar_ports: SidecarPorts | None = None
        self.metrics_url = ""
        self._metrics_server: uvicorn.Server | None = None
        self._metrics_task: asyncio.Task[None] | None = None
        self.started_in = 0.0

    # -- the parts the steps use ------------------------------------------------------

    def api(self) -> AdminClient:
        if self.admin is None:
            raise DemoError("the control plane is not running")
        return self.admin

    def mesh(self, name: str) -> Mesh:
        return self.instances[name].mesh

    def payments(self) -> list[InProcess]:
        return [i for i in self.instances.values() if i.workload == "payments"]

    def instance_at(self, port: int) -> str:
        """The instance (or the sidecar) listening on ``port``."""
        for instance in self.instances.values():
            if instance.port == port:
                return instance.name
        if self.sidecar_ports is not None and port == self.sidecar_ports.inbound:
            return "ledger (sidecar)"
        return f"port {port}"

    # -- start ------------------------------------------------------------------------

    async def start(self) -> None:
        started = time.monotonic()
        await self.cp.start()
        self.admin = AdminClient(self.cp.url, self.cp.admin_token)
        change = await self.admin.apply("the shop's policy (mTLS STRICT, payments' subsets, all to v1)", base(), ())
        self.base_version = change.version
        tokens = {sa: await self.admin.token(NAMESPACE, sa) for sa in ("frontend", "orders", "payments", "ledger")}
        await self._start_ledger(tokens["ledger"])  # child processes first: they take longest to boot
        specs = [
            ("frontend", "frontend", "v1"),
            ("orders", "orders", "v1"),
            ("payments-v1-a", "payments", "v1"),
            ("payments-v1-b", "payments", "v1"),
            ("payments-v2", "payments", "v2"),
            ("ledger-in-process", "ledger", "v1"),
        ]
        meshes = await asyncio.gather(
            *(self._connect(name, workload, version, tokens[workload]) for name, workload, version in specs)
        )
        for (name, workload, version), mesh in zip(specs, meshes, strict=True):
            self.instances[name] = instance = InProcess(name, workload, version, mesh)
            if workload == "orders":
                instance.app = OrdersApp(mesh)
            elif workload == "payments":
                instance.app = PaymentsApp(name, version)
            elif workload == "ledger":
                instance.app = _ledger_app.app  # the very app the sidecar fronts, here behind MeshMiddleware
                instance.service_host = "ledger-in-process"  # a host of its own: `ledger` is the sidecar's
        await self.loop.run(self._serve_all(), timeout=_STARTUP_TIMEOUT)
        await self._sidecar_ready()
        await self._wait_for_registry()
        self.started_in = time.monotonic() - started

    async def _connect(self, name: str, workload: str, version: str, token: str) -> Mesh:
        who = Workload(workload, namespace=NAMESPACE, labels={"version": version})
        mesh = await Mesh.connect(
            self.cp.url, workload=who, token=token, cache_dir=self.workdir / "cache" / name, timeout=20.0
        )
        if mesh.agent is not None:
            mesh.agent.report_interval = 1.0  # the dashboard's rates move within seconds
        return mesh

    async def _start_ledger(self, token: str) -> None:
        """The ledger app (a script: no meshlib in its process), then its sidecar once the app listens.

        Both are started from the main thread (see ``Child``); only the waiting is done in another.
        """
        script = Path(_ledger_app.__file__)
        # -P: the script's folder (meshlib/demo) stays off sys.path, so nothing of meshlib can be imported by accident.
        app = self.ledger_app = self.children.start("ledger-app", [sys.executable, "-P", str(script), "--port", "0"])
        found = await asyncio.to_thread(app.wait_for_line, r"ledger listening on [\d.]+:(\d+)", _STARTUP_TIMEOUT)
        self.ledger_port = int(found.group(1))
        env = {**os.environ, "MESHLIB_TOKEN": token}  # not --token: argv is visible to every user in `ps`
        self.sidecar = self.children.start(
            "ledger-sidecar",
            [
                sys.executable,
                "-m",
                "meshlib",
                "sidecar",
                "--workload",
                "ledger",
                "--namespace",
                NAMESPACE,
                "--labels",
                "version=v1",
                "--control-plane",
                self.cp.url,
                "--cache-dir",
                str(self.workdir / "cache" / "ledger-sidecar"),
                "--app",
                f"127.0.0.1:{self.ledger_port}",
                "--inbound",
                "127.0.0.1:0",
                "--outbound",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--drain-timeout",
                "2",
            ],
            env,
        )

    async def _sidecar_ready(self) -> None:
        assert self.sidecar is not None
        found = await asyncio.to_thread(
            self.sidecar.wait_for_line,
            r"sidecar ready: outbound [\d.]+:(\d+).*inbound [^:]*:(\d+).*admin [^:]*:(\d+)",
            _STARTUP_TIMEOUT,
        )
        self.sidecar_ports = SidecarPorts(int(found.group(2)), int(found.group(1)), int(found.group(3)))

    async def _serve_all(self) -> None:
        """In the shop's loop: every server, then the metrics page."""
        for instance in self.instances.values():
            if instance.app is None:
                continue
            options = dict(_QUIET)
            if instance.service_host:
                options["service_host"] = instance.service_host
            server = MeshServer(
                MeshMiddleware(instance.app, mesh=instance.mesh),
                mesh=instance.mesh,
                host="127.0.0.1",
                port=0,
                **options,
            )
            instance.server = server
            instance.task = asyncio.create_task(server.serve(), name=f"meshlib-demo-{instance.name}")
        await self._serve_metrics()
        limit = time.monotonic() + _STARTUP_TIMEOUT
        for instance in self.instances.values():
            while instance.server is not None and not instance.server.started:
                if instance.task is not None and instance.task.done():
                    instance.task.result()
                    raise DemoError(f"{instance.name} stopped as it started")
                if time.monotonic() > limit:
                    raise DemoError(f"{instance.name} did not start listening")
                await asyncio.sleep(0.01)

    async def _serve_metrics(self) -> None:
        """One plain loopback page with every in-process instance's Prometheus metrics (their ports are mTLS only)."""
        names = list(self.instances)

        async def index(request: Any) -> HTMLResponse:
            links = "".join(f'<li><a href="/metrics/{n}">{n}</a></li>' for n in names)
            return HTMLResponse(f"<h1>meshlib demo</h1><ul>{links}</ul>")

        routes: list[Any] = [Route("/", index)]
        routes += [Route(f"/metrics/{n}", _Asgi(self.instances[n].mesh.metrics_app())) for n in names]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.metrics_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._metrics_server = uvicorn.Server(uvicorn.Config(Starlette(routes=routes), **_QUIET))
        self._metrics_task = asyncio.create_task(self._metrics_server.serve(sockets=[sock]))

    async def _wait_for_registry(self) -> None:
        """Until every server is in the registry and the callers' pushed snapshots route to all of them."""
        expected = {"orders": 1, "payments": 3, "ledger": 1, "ledger-in-process": 1}
        wants = {
            "frontend": {"orders": 1, "ledger": 1},
            "orders": {"payments": 3, "ledger": 1, "ledger-in-process": 1},
        }
        limit = time.monotonic() + _STARTUP_TIMEOUT
        while True:
            registry = await self.api().registry()
            hosts: dict[str, int] = {}
            for r in registry:
                host = (r.get("host") or r["workload"]).split(".")[0]
                hosts[host] = hosts.get(host, 0) + 1
            seen = {caller: _endpoints(self.mesh(caller), list(hosts_wanted)) for caller, hosts_wanted in wants.items()}
            # The last registration was pushed to every data plane: wait for all of them to ACK it.
            states = [d["state"] for d in await self.api().dataplanes() if d["state"] != "DISCONNECTED"]
            if (
                all(hosts.get(h, 0) >= n for h, n in expected.items())
                and all(seen[c].get(h, 0) >= n for c, w in wants.items() for h, n in w.items())
                and len(states) == len(self.instances) + 1  # and the sidecar
                and all(state == "ACKED" for state in states)
            ):
                return
            if time.monotonic() > limit:
                raise DemoError(
                    f"the shop did not come together: registry {hosts}, callers see {seen}, data planes {states}"
                )
            if self.sidecar is not None and not self.sidecar.running():
                raise DemoError(f"the ledger's sidecar exited:\n{self.sidecar.why()}")
            await asyncio.sleep(0.05)

    # -- stop -------------------------------------------------------------------------

    async def stop(self) -> None:
        """Servers (they deregister), meshes, the sidecar and the app, the control plane; each part bounded."""
        with contextlib.suppress(Exception):
            await self.loop.run(self._stop_servers(), timeout=10)
        self.loop.stop()
        await asyncio.gather(
            *(asyncio.to_thread(i.mesh.close) for i in self.instances.values()), return_exceptions=True
        )
        await asyncio.to_thread(self.children.stop_all)
        if self.admin is not None:
            await self.admin.aclose()
        await self.cp.stop()

    async def _stop_servers(self) -> None:
        tasks = []
        for instance in self.instances.values():
            if instance.server is not None and instance.task is not None:
                instance.server.should_exit = True
                tasks.append(instance.task)
        if self._metrics_server is not None and self._metrics_task is not None:
            self._metrics_server.should_exit = True
            tasks.append(self._metrics_task)
        await asyncio.gather(*tasks, return_exceptions=True)
        for instance in self.instances.values():
            if isinstance(instance.app, OrdersApp):
                await instance.app.aclose()

    # -- helpers for the steps ----------------------------------------------------------

    async def sidecar_config(self) -> dict[str, Any]:
        """The sidecar's admin ``/config`` (its certificate's identity and expiry, its configuration version)."""
        if self.sidecar_ports is None:
            return {}
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(f"http://127.0.0.1:{self.sidecar_ports.admin}/config")
            r.raise_for_status()
            data: dict[str, Any] = r.json()
            return data


class _Asgi:
    """A plain ASGI app as a Starlette route endpoint (a bare function would be taken for a request handler)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _endpoints(mesh: Mesh, short_hosts: list[str]) -> dict[str, int]:
    snapshot = mesh.snapshot
    found: dict[str, int] = {}
    for host in short_hosts:
        service = snapshot.services.get(snapshot.canonical(host, NAMESPACE))
        found[host] = len(service.endpoints) if service is not None else 0
    return found
