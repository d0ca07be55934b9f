"""``meshlib.serve`` and ``MeshServer``: uvicorn, with the mesh's mTLS decided per connection.

uvicorn does the HTTP; meshlib only replaces its per-connection protocol through
the public ``Config(http=...)`` hook (see ``_protocol``), so every uvicorn option
but its own TLS ones still applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Any

import uvicorn

from .._exceptions import MeshError, SecurityError
from ..mesh import Mesh
from ._peer import ASGIApp
from ._protocol import HANDSHAKE_TIMEOUT, Inbound, MeshHttpProtocol

if TYPE_CHECKING:  # the control layer sits above this one; the agent is reached through mesh.agent
    from ..control import RegisteredEndpoint

__all__ = ["MeshServer", "serve"]

log = logging.getLogger("meshlib")

_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})
DEREGISTER_WAIT = 2.0
"""How long shutdown waits for the control plane to drop this server from the registry."""

_UVICORN_TLS = frozenset(
    {
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_keyfile_password",
        "ssl_version",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ciphers",
        "ssl_context_factory",
        "http2",
    }
)
_ONE_PROCESS = frozenset({"reload", "workers"})


class _MeshConfig(uvicorn.Config):
    """uvicorn's config, with meshlib's protocol in front of the one ``http=`` names."""

    def __init__(self, app: ASGIApp, inbound: Inbound, **options: Any) -> None:
        super().__init__(app, http=MeshHttpProtocol, **options)
        self.meshlib_inbound = inbound

    def load(self) -> None:
        super().load()
        self.meshlib_inbound.load(self)


class MeshServer(uvicorn.Server):
    """A uvicorn server whose connections follow the mesh's PeerAuthentication (embeddable).

    ``await server.serve()`` in a running loop or ``server.run()`` to block;
    ``server.started`` turns True once it listens, ``server.port`` is then the bound
    port (useful with ``port=0``), and ``server.should_exit = True`` stops it.
    ``handshake_timeout`` bounds both the wait for a connection's first byte and
    its TLS handshake. ``http=`` picks uvicorn's HTTP implementation as usual.

    With a connected mesh (``Mesh.connect``) the server registers itself with the
    control plane once it listens (the bound port, so ``port=0`` works) and
    deregisters when it shuts down, before it closes its connections, so callers
    stop routing to it while its last requests finish. ``advertise`` is the address
    to register (default: ``host``; for a wildcard bind, the address this machine
    reaches the control plane from); ``service_host`` and ``service_port`` name the
    service it serves (default ``NAME.NS.svc.cluster.local``, port 80);
    ``register=False`` keeps it out of the registry.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        mesh: Mesh,
        host: str = "127.0.0.1",
        port: int = 8443,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        register: bool = True,
        advertise: str | None = None,
        service_host: str | None = None,
        service_port: int = 80,
        **uvicorn_options: Any,
    ) -> None:
        tls = sorted(_UVICORN_TLS & uvicorn_options.keys())
        if tls:
            raise SecurityError(
                f"meshlib.serve terminates TLS itself with the workload's certificate; drop {', '.join(tls)}"
            )
        if uvicorn_options.get("reload") or (uvicorn_options.get("workers") or 1) > 1:
            raise ValueError("meshlib.serve runs one process: start one per core instead of reload= / workers=")
        for name in _ONE_PROCESS:
            uvicorn_options.pop(name, None)
        inbound = Inbound(mesh, uvicorn_options.pop("http", "auto"), handshake_timeout)
        self.mesh = mesh
        self._inbound = inbound
        self._register = register
        self._advertise = advertise
        self._service_host = service_host
        self._service_port = service_port
        self.registration: RegisteredEndpoint | None = None
        """This server in the control plane's registry (None when not connected, or not yet listening)."""
        super().__init__(_MeshConfig(app, inbound, host=host, port=port, **uvicorn_options))

    @property
    def port(self) -> int:
        """The port it listens on: the bound one once started (so ``port=0`` gives the real one)."""
        for server in getattr(self, "servers", ()):
            for sock in server.sockets:
                name = sock.getsockname()
                if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(name, tuple):
                    return int(name[1])
        return int(self.config.port)

    def check(self) -> None:
        """Refuse to start where PeerAuthentication STRICT applies but there is no certificate to serve TLS with."""
        port = self.config.port or None
        if self.mesh.certificates is None and self._inbound.mode_for(port) == "STRICT":
            policy = self._inbound.mtls()
            source = ", ".join(policy.sources) or "PeerAuthentication"
            raise SecurityError(
                f"port {self.config.port} requires mutual TLS ({source}: STRICT) but the mesh has no workload "
                "certificate: give Mesh a ca= (see `meshlib ca init`) or connect it to a control plane"
            )

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.check()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        agent = self.mesh.agent
        if self.started and agent is not None and self._register and not self.config.uds:
            address = self._advertise or self.config.host
            try:
                if address in _WILDCARDS:
                    address = agent.advertise_address()
                self.registration = agent.register(
                    address.strip("[]"), self.port, service_port=self._service_port, host=self._service_host
                )
            except (MeshError, OSError) as exc:  # serving matters more than being found: say so, carry on
                log.warning("meshlib: not registering %s:%d with the control plane: %s", address, self.port, exc)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        registration, self.registration = self.registration, None
        agent = self.mesh.agent
        if registration is not None and agent is not None:
            try:
                await asyncio.wait_for(asyncio.wrap_future(agent.deregister(registration)), DEREGISTER_WAIT)
            except Exception as exc:  # TimeoutError included: the registry's ttl drops it anyway
                log.debug("meshlib: deregistering %s:%d did not finish (%r)", registration.address, self.port, exc)
        await super().shutdown(sockets)


def serve(app: ASGIApp, *, mesh: Mesh, host: str = "127.0.0.1", port: int = 8443, **uvicorn_options: Any) -> None:
    """Serve ``app`` with uvicorn until stopped, with the mesh's mTLS (blocking, like ``uvicorn.run``)."""
    server = MeshServer(app, mesh=mesh, host=host, port=port, **uvicorn_options)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
