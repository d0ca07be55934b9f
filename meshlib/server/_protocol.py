"""The connection-level half of the server: PeerAuthentication's mTLS mode, decided per connection.

uvicorn terminates TLS for a whole listener or not at all, while Istio's
PERMISSIVE mode takes TLS and plaintext on one port, and the mode may change
while the server runs. So meshlib listens in plaintext and puts a small protocol
(:class:`MeshHttpProtocol`, uvicorn's public ``Config(http=...)`` hook) in front of
uvicorn's own. When a connection is accepted it reads the mode for the port from
the snapshot in force, then:

- DISABLE: hands the transport straight to uvicorn's protocol;
- PERMISSIVE / STRICT: waits for the first bytes; a TLS record (0x16) goes through
  ``asyncio.sslproto.SSLProtocol`` with the workload's current server context
  (client certificate required, SPIFFE id checked in the handshake), anything else
  is plaintext (PERMISSIVE) or a short 400 (STRICT).

The sniffed bytes are replayed, so neither path loses a byte. This runs on
uvicorn's default loop (uvloop when installed) as on asyncio's: both take
``transport.set_protocol`` to a BufferedProtocol mid-connection; on uvloop the
TLS layer is then asyncio's (pure Python) ``SSLProtocol``, not uvloop's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from asyncio.sslproto import SSLProtocol
from typing import Any

from uvicorn.config import HTTP_PROTOCOLS, Config
from uvicorn.importer import import_from_string
from uvicorn.server import ServerState

from .._exceptions import MeshError
from ..mesh import Mesh
from ..policy import MtlsPolicy, Snapshot, Workload
from ..security import PeerIdentityError
from ._peer import ASGIApp, ConnectionApp, PlaintextApp

__all__ = ["HANDSHAKE_TIMEOUT", "STRICT_REFUSAL", "Inbound", "MeshHttpProtocol"]

log = logging.getLogger("meshlib.server")

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a new connection has to send its first byte, and then to finish the TLS handshake."""

_TLS_HANDSHAKE_RECORD = 0x16

STRICT_BODY = b"meshlib: this port requires mutual TLS (PeerAuthentication STRICT)"
STRICT_REFUSAL = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: " + str(len(STRICT_BODY)).encode() + b"\r\n"
    b"connection: close\r\n"
    b"\r\n" + STRICT_BODY
)


class Inbound:
    """What every connection of one server shares: the mesh, the mode lookup, uvicorn's real protocol."""

    def __init__(self, mesh: Mesh, http: str | type[asyncio.Protocol], handshake_timeout: float) -> None:
        if mesh.workload is None:
            raise MeshError(
                "meshlib.serve needs a mesh with a workload (Mesh(..., workload=...)): "
                "which PeerAuthentication applies depends on it"
            )
        self.mesh = mesh
        self.workload: Workload = mesh.workload
        self.handshake_timeout = handshake_timeout
        self._http = http
        self._policy: tuple[Snapshot, MtlsPolicy] | None = None
        self.protocol_class: type[asyncio.Protocol] | None = None
        self.app: ASGIApp | None = None

    def load(self, config: Config) -> None:
        """Once uvicorn has loaded the app: resolve the real protocol as ``http="auto"`` would, wrap the app."""
        http = self._http
        self.protocol_class = import_from_string(HTTP_PROTOCOLS.get(http, http)) if isinstance(http, str) else http
        self.app = config.loaded_app
        # Every protocol uvicorn makes (HTTP, WebSocket) reads the app from here; TLS connections replace it.
        config.loaded_app = PlaintextApp(config.loaded_app)

    def mtls(self) -> MtlsPolicy:
        """The PeerAuthentication in force, recomputed only when the snapshot changed."""
        snapshot = self.mesh.snapshot
        cached = self._policy
        if cached is None or cached[0] is not snapshot:
            cached = self._policy = (snapshot, snapshot.mtls(self.workload))
        return cached[1]

    def mode_for(self, port: int | None) -> str:
        return self.mtls().mode_for(port)


class MeshHttpProtocol(asyncio.Protocol):
    """Stands in front of uvicorn's protocol until the connection's mTLS mode is known."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        inbound = getattr(config, "meshlib_inbound", None)
        if not isinstance(inbound, Inbound):
            raise TypeError("MeshHttpProtocol serves configs made by meshlib.server.MeshServer")
        self._inbound = inbound
        self._config = config
        self._server_state = server_state
        self._app_state = app_state
        self._loop = _loop or asyncio.get_running_loop()
        self._connections: set[Any] = server_state.connections
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._mode = "PERMISSIVE"
        self._port: int | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        sockname = transport.get_extra_info("sockname")
        self._port = sockname[1] if isinstance(sockname, tuple) else None
        self._mode = self._inbound.mode_for(self._port)
        if self._mode == "DISABLE":
            self._plaintext(b"")
            return
        self._connections.add(self)  # so that uvicorn's shutdown closes a connection still deciding
        self._timer = self._loop.call_later(self._inbound.handshake_timeout, self._idle)

    def data_received(self, data: bytes) -> None:
        self._cancel_timer()
        if data[0] == _TLS_HANDSHAKE_RECORD:
            self._tls(data)
        elif self._mode == "STRICT":
            self._refuse_plaintext()
        else:
            self._connections.discard(self)
            self._plaintext(data)

    def eof_received(self) -> bool | None:
        return False  # closed before saying anything: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._connections.discard(self)

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: a connection that has not been handed over yet just closes."""
        if self._transport is not None:
            self._transport.close()

    # -- the three ways on ----------------------------------------------------------------

    def _real(self) -> Any:
        cls = self._inbound.protocol_class
        assert cls is not None, "Inbound.load() runs when uvicorn loads the config"
        return cls(  # type: ignore[call-arg]
            config=self._config, server_state=self._server_state, app_state=self._app_state, _loop=self._loop
        )

    def _plaintext(self, data: bytes) -> None:
        assert self._transport is not None
        real = self._real()
        self._transport.set_protocol(real)
        real.connection_made(self._transport)
        if data:
            real.data_received(data)

    def _refuse_plaintext(self) -> None:
        assert self._transport is not None
        log.warning(
            "meshlib: refused a plaintext connection from %s on port %s: PeerAuthentication STRICT requires mutual TLS",
            self._peer_address(),
            self._port,
        )
        self._transport.write(STRICT_REFUSAL)
        self._transport.close()

    def _tls(self, data: bytes) -> None:
        assert self._transport is not None
        certificates = self._inbound.mesh.certificates
        if certificates is None:
            log.error(
                "meshlib: closed a TLS connection from %s on port %s: PeerAuthentication %s asks for mTLS but "
                "this mesh has no workload certificate (pass ca= to Mesh, or connect it to a control plane)",
                self._peer_address(),
                self._port,
                self._mode,
            )
            self._transport.close()
            return
        context = certificates.server_context()  # per connection: rotation swaps it
        server_cert = certificates.issued.leaf_pem
        real = self._real()
        app = self._inbound.app
        assert app is not None
        connection_app = ConnectionApp(app, real, server_cert)
        real.app = connection_app
        if real.ws_protocol_class is not None:
            real.ws_protocol_class = _WithApp(real.ws_protocol_class, connection_app)
        waiter = self._loop.create_future()
        waiter.add_done_callback(self._handshake_done)
        sslproto = _SSLProtocol(
            self._loop,
            real,
            context,
            waiter,
            server_side=True,
            ssl_handshake_timeout=math.ceil(self._inbound.handshake_timeout),  # typeshed: whole seconds
        )
        self._transport.set_protocol(sslproto)
        sslproto.connection_made(self._transport)
        view = memoryview(data)
        while view and not self._transport.is_closing():
            buffer = sslproto.get_buffer(len(view))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            view = view[n:]
            sslproto.buffer_updated(n)

    def _handshake_done(self, waiter: asyncio.Future[None]) -> None:
        self._connections.discard(self)  # uvicorn's protocol tracks itself from here on
        exc = None if waiter.cancelled() else waiter.exception()
        if exc is None or isinstance(exc, PeerIdentityError):  # the peer check already said why
            return
        reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc)
        log.warning(
            "meshlib: TLS handshake from %s on port %s failed: %s",
            self._peer_address(),
            self._port,
            reason or type(exc).__name__,
        )

    def _idle(self) -> None:
        self._timer = None
        log.info(
            "meshlib: closed a connection from %s on port %s that sent nothing for %.0f s",
            self._peer_address(),
            self._port,
            self._inbound.handshake_timeout,
        )
        if self._transport is not None:
            self._transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _peer_address(self) -> str:
        if self._transport is None:
            return "?"
        peer = self._transport.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


class _SSLProtocol(SSLProtocol):
    """asyncio's TLS protocol, but a failed handshake first sends its alert (``certificate required``...).

    asyncio drops the alert OpenSSL wrote and resets the connection, which clients
    report as "connection reset by peer"; with the alert they say what was wrong.
    """

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        flush = getattr(self, "_process_outgoing", None)  # asyncio's own (3.11+); skipped if it ever goes
        if handshake_exc is not None and flush is not None:
            with contextlib.suppress(Exception):
                flush()
        super()._on_handshake_complete(handshake_exc)


class _WithApp:
    """uvicorn's WebSocket protocol class, made to serve one connection's app (with its peer identity)."""

    __slots__ = ("_app", "_cls")

    def __init__(self, cls: Any, app: ConnectionApp) -> None:
        self._cls = cls
        self._app = app

    def __call__(self, **kwargs: Any) -> Any:
        protocol = self._cls(**kwargs)
        protocol.app = self._app
        return protocol
