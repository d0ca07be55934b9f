"""``Sidecar``: the inbound, outbound and admin listeners of one workload, in one process and one event loop.

All three share one ``Mesh``, so a configuration pushed by the control plane (or a
changed file) reaches both directions at once, and connections already open carry on:
the swap is the mesh's, per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from .._exceptions import MeshError, PolicyError
from ..mesh import Mesh
from ..policy import Snapshot, Workload
from ..policy._load import expand_paths
from ..server import MeshMiddleware, MeshServer
from ._admin import admin_app
from ._http import HttpProtocol
from ._inbound import AppForwarder
from ._outbound import OutboundProxy

__all__ = ["Sidecar", "SidecarOptions", "run_sidecar"]

log = logging.getLogger("meshlib.sidecar")

_COMMON: dict[str, Any] = {
    "log_level": "warning",
    "lifespan": "off",
    "server_header": False,  # a proxy passes the app's headers, it does not add its own
    "date_header": False,
    "http": HttpProtocol,  # uvicorn's httptools protocol, refusing request heads over 60 KiB with 431
    "access_log": False,  # the mesh writes Envoy-style access logs (MeshConfig accessLog); uvicorn's would double them
    "proxy_headers": False,  # X-Forwarded-* are the app's to read, not this server's to act on
}


def split_address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise MeshError(f"{what} {text!r}: use HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class SidecarOptions:
    workload: str
    app: str
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    service_account: str = ""
    config: Sequence[str] = ()
    ca: str | None = None
    control_plane: str | None = None
    token: str | None = None
    cache_dir: str | None = None
    verify: str | None = None
    inbound: str = "0.0.0.0:15006"
    outbound: str = "127.0.0.1:15001"
    admin: str = "127.0.0.1:15000"
    drain_timeout: float = 15.0
    reload_interval: float = 1.0


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to the sidecar, which stops its three servers in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _MeshServer(MeshServer):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Sidecar:
    """Three listeners around one mesh; ``await start()``, then ``await stop()`` (drains in-flight requests)."""

    def __init__(
        self,
        mesh: Mesh,
        *,
        app: str,
        inbound: str = "0.0.0.0:15006",
        outbound: str = "127.0.0.1:15001",
        admin: str = "127.0.0.1:15000",
        drain_timeout: float = 15.0,
        config_paths: Sequence[str] = (),
        reload_interval: float = 1.0,
    ) -> None:
        self.mesh = mesh
        app_host, app_port = split_address(app, "--app")
        self.app_address = f"{app_host}:{app_port}"
        in_host, in_port = split_address(inbound, "--inbound")
        out_host, out_port = split_address(outbound, "--outbound")
        admin_host, admin_port = split_address(admin, "--admin")
        self.forwarder = AppForwarder(mesh, self.app_address)
        self.proxy = OutboundProxy(mesh)
        self.draining = False
        self._ready = False
        graceful: dict[str, Any] = {"timeout_graceful_shutdown": int(max(1, drain_timeout))}
        inbound_app = MeshMiddleware(self.forwarder, mesh=mesh)
        self.inbound = _MeshServer(inbound_app, mesh=mesh, host=in_host, port=in_port, **_COMMON, **graceful)
        self.outbound = _Server(uvicorn.Config(self.proxy, host=out_host, port=out_port, **_COMMON, **graceful))
        self.admin = _Server(
            uvicorn.Config(admin_app(mesh, self.is_ready), host=admin_host, port=admin_port, **_COMMON)
        )
        self._config_paths = list(config_paths)
        self._reload_interval = reload_interval
        self._tasks: list[asyncio.Task[None]] = []
        self._stamp = self._config_stamp()

    def is_ready(self) -> bool:
        return self._ready and not self.draining

    @property
    def ports(self) -> dict[str, int]:
        """The ports actually bound (useful with port 0)."""
        return {"inbound": self.inbound.port, "outbound": _port(self.outbound), "admin": _port(self.admin)}

    async def start(self) -> None:
        for server in (self.admin, self.outbound, self.inbound):
            task = asyncio.create_task(server.serve(), name=f"meshlib-sidecar-{id(server)}")
            self._tasks.append(task)
            while not server.started:
                if task.done():
                    task.result()  # raises what stopped it (a port in use...)
                    raise MeshError("a sidecar listener stopped at start")
                await asyncio.sleep(0.01)
        if self._config_paths:
            self._tasks.append(asyncio.create_task(self._watch_files(), name="meshlib-sidecar-reload"))
        self._ready = True
        ports = self.ports
        log.info(
            "meshlib sidecar for %s: inbound :%d -> %s, outbound :%d, admin :%d, configuration %s",
            self.mesh.workload.spiffe_id if self.mesh.workload else "?",
            ports["inbound"],
            self.app_address,
            ports["outbound"],
            ports["admin"],
            self.mesh.version,
        )

    async def stop(self) -> None:
        """Drain: stop accepting, deregister, let in-flight requests finish (up to the drain timeout), then close."""
        self.draining = True
        self.inbound.should_exit = True  # deregisters first, then waits for its in-flight requests
        self.outbound.should_exit = True
        servers = [t for t in self._tasks if not t.get_name().endswith("reload")]
        reload = [t for t in self._tasks if t.get_name().endswith("reload")]
        for task in reload:
            task.cancel()
        await asyncio.gather(*servers[1:], return_exceptions=True)  # inbound and outbound
        self.admin.should_exit = True
        await asyncio.gather(*servers[:1], *reload, return_exceptions=True)
        await self.forwarder.aclose()
        await self.proxy.aclose()

    def _config_stamp(self) -> tuple[tuple[str, float, int], ...]:
        files, _ = expand_paths(self._config_paths)
        stamps = []
        for f in files:
            with contextlib.suppress(OSError):
                st = f.stat()
                stamps.append((str(f), st.st_mtime, st.st_size))
        return tuple(stamps)

    async def _watch_files(self) -> None:
        """Reload the files when they change; a bad edit is logged and the configuration in force stays."""
        while True:
            await asyncio.sleep(self._reload_interval)
            stamp = await asyncio.to_thread(self._config_stamp)
            if stamp == self._stamp:
                continue
            # Load only once the files stopped changing for an interval: an editor saving in place
            # could otherwise be read half-written (an empty file is a valid, empty configuration).
            await asyncio.sleep(self._reload_interval)
            if await asyncio.to_thread(self._config_stamp) != stamp:
                continue
            self._stamp = stamp
            try:
                snapshot = await asyncio.to_thread(Snapshot.from_files, *self._config_paths)
                version = self.mesh.update(snapshot)
            except (PolicyError, MeshError, OSError) as exc:
                log.error("configuration files changed but are refused; keeping %s: %s", self.mesh.version, exc)
                continue
            log.info("configuration files reloaded: %s in force", version)


def _port(server: uvicorn.Server) -> int:
    for s in server.servers:
        for sock in s.sockets:
            return int(sock.getsockname()[1])
    return int(server.config.port)


async def build_mesh(options: SidecarOptions) -> Mesh:
    workload = Workload(
        options.workload,
        namespace=options.namespace,
        labels=options.labels,
        service_account=options.service_account,
    )
    if options.control_plane:
        if options.config:
            raise MeshError("give --config or --control-plane, not both")
        token = options.token or os.environ.get("MESHLIB_TOKEN")
        if not token:
            raise MeshError("--control-plane needs --token (or MESHLIB_TOKEN)")
        return await Mesh.connect(
            options.control_plane,
            workload=workload,
            token=token,
            cache_dir=options.cache_dir,
            verify=options.verify or True,
        )
    if not options.config:
        raise MeshError("give --config PATH... (static) or --control-plane URL --token T")
    return Mesh.from_files(*options.config, workload=workload, ca=options.ca)


async def run_sidecar(options: SidecarOptions) -> int:
    mesh = await build_mesh(options)
    sidecar = Sidecar(
        mesh,
        app=options.app,
        inbound=options.inbound,
        outbound=options.outbound,
        admin=options.admin,
        drain_timeout=options.drain_timeout,
        config_paths=options.config if not options.control_plane else (),
        reload_interval=options.reload_interval,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await sidecar.start()
        ports = sidecar.ports
        print(
            f"meshlib sidecar ready: outbound 127.0.0.1:{ports['outbound']} (HTTP_PROXY), "
            f"inbound :{ports['inbound']} -> {sidecar.app_address}, admin :{ports['admin']}",
            flush=True,
        )
        await stopping.wait()
        log.info("draining (up to %g s)", options.drain_timeout)
        await sidecar.stop()
    finally:
        await mesh.aclose()
    return 0


def main(options: SidecarOptions) -> int:
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        runner = asyncio.run
    try:
        return int(runner(run_sidecar(options)))
    except (MeshError, OSError) as exc:
        print(f"meshlib sidecar: {exc}", flush=True)
        return 1


def parse_labels(text: str | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MeshError(f"--labels {text!r}: use k=v,k2=v2")
        labels[key.strip()] = value.strip()
    return labels
