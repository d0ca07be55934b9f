"""``Mesh``: the snapshot in force plus the engines' state, shared by every adapter.

A service makes one ``Mesh`` (from files, parsed documents, or later the control
plane) and hands it to its clients and middleware. Updates build a new snapshot
and swap it in one assignment; a request in flight finishes on the snapshot it
started with, and engine state (breakers, ejections, budgets, load) carries over
for every destination whose policy did not change.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import httpx
from opentelemetry.trace import TracerProvider

from ._exceptions import SecurityError
from .engine import Inbound, Outbound
from .policy import Resource, Snapshot, SpiffeId, Workload
from .security import CertificateAuthority, LocalIssuer, TlsContexts, WorkloadCertificates
from .telemetry import EngineState, Telemetry, metrics_app
from .telemetry._endpoint import ASGIApp

if TYPE_CHECKING:  # the control layer sits above this one: imported lazily, in connect()
    from .control import Agent

CaSource = CertificateAuthority | str | os.PathLike[str]

__all__ = ["Mesh"]

log = logging.getLogger("meshlib")


class Mesh:
    """The live configuration of one workload, and the engines acting on it."""

    def __init__(
        self,
        snapshot: Snapshot,
        workload: Workload | str | None = None,
        *,
        seed: int | None = None,
        ca: CaSource | None = None,
        certificates: WorkloadCertificates | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.workload: Workload | None = Workload.coerce(workload) if workload is not None else None
        self._rng = random.Random(seed)
        self._outbound = Outbound(snapshot, self.workload, self._rng)
        self._inbound: Inbound | None = None
        for warning in snapshot.warnings:
            log.warning("%s", warning)
        if certificates is None and ca is not None:
            certificates = self._certificates_from(ca, snapshot)
        self.certificates: WorkloadCertificates | None = certificates
        """The workload's certificate and its renewal (None: no identity, plaintext only)."""
        self.tls = TlsContexts(certificates)
        self.telemetry = Telemetry(
            snapshot.mesh_config,
            service_name=self.workload.name if self.workload is not None else "unknown",
            namespace=self.workload.namespace if self.workload is not None else None,
            engine_state=self._engine_state,
            tracer_provider=tracer_provider,
        )
        """Metrics, access log and tracing, configured by the snapshot's MeshConfig."""
        self.agent: Agent | None = None
        """The connection to the control plane (``Mesh.connect``); None for a static mesh.

        ``mesh.agent.version`` is the control plane's version in force (an int),
        ``mesh.agent.stale`` whether the control plane has confirmed it lately.
        """
        if certificates is not None:
            certificates.start()

    def _adopt_certificates(self, certificates: WorkloadCertificates) -> None:
        """Take a certificate that arrived after the mesh started (a stale boot without one, then the CA came back).

        Adapters read ``certificates`` per connection, so the next one uses it.
        """
        self.certificates = certificates
        self.tls.certificates = certificates
        certificates.start()

    def _certificates_from(self, ca: CaSource, snapshot: Snapshot) -> WorkloadCertificates:
        """Static mode: a CA on this machine issues and renews the workload's certificate."""
        if self.workload is None:
            raise SecurityError("a workload certificate needs a workload: pass workload= with ca=")
        domain = snapshot.mesh_config.trust_domain
        authority = ca if isinstance(ca, CertificateAuthority) else CertificateAuthority.load(ca, trust_domain=domain)
        if authority.trust_domain != domain:
            raise SecurityError(
                f"the CA signs for trust domain {authority.trust_domain!r} but MeshConfig says {domain!r}"
            )
        settings = snapshot.mesh_config.certificates
        return WorkloadCertificates(
            self._identity_in(domain),
            LocalIssuer(authority),
            ttl=settings.ttl,
            grace_ratio=settings.grace_ratio,
            rng=self._rng,
        )

    def _identity_in(self, domain: str) -> SpiffeId:
        assert self.workload is not None
        return SpiffeId.of(self.workload.namespace, self.workload.service_account, domain)

    @property
    def identity(self) -> SpiffeId | None:
        """The SPIFFE id this workload proves with its certificate (None without one)."""
        return self.certificates.identity if self.certificates is not None else None

    def close(self) -> None:
        """Disconnect from the control plane (deregistering, bounded wait), stop renewing the certificate,
        close the access log, flush spans (clients and servers close on their own)."""
        if self.agent is not None:
            self.agent.close()
        if self.certificates is not None:
            self.certificates.stop()
        self.telemetry.close()

    async def aclose(self) -> None:
        """:meth:`close` without blocking the caller's event loop (it may wait on the control plane)."""
        await asyncio.to_thread(self.close)

    def _engine_state(self) -> EngineState:
        """What the metrics collector reads at scrape time (never on the request path)."""
        workload = self.workload
        return EngineState(
            outbound=self._outbound,
            inbound=self._inbound,
            certificates=self.certificates,
            version=self.version,
            workload=workload.name if workload is not None else "unknown",
            namespace=workload.namespace if workload is not None else "unknown",
        )

    def metrics_app(self) -> ASGIApp:
        """The ASGI app serving this mesh's Prometheus metrics (mount it at ``/metrics``)."""
        return metrics_app(self.telemetry.registry)

    # -- construction ------------------------------------------------------------

    @classmethod
    def from_files(
        cls,
        *paths: str | os.PathLike[str],
        workload: Workload | str | None = None,
        seed: int | None = None,
        ca: CaSource | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> Mesh:
        """A static mesh from YAML files or folders (one configuration; errors raise PolicyError).

        ``ca`` (a folder made by ``meshlib ca init``, or a ``CertificateAuthority``)
        gives the workload a certificate, so it speaks the mesh's mTLS.
        ``tracer_provider``: spans go to this OpenTelemetry provider (its sampler and
        exporters) instead of the one meshlib builds from MeshConfig.
        """
        return cls(Snapshot.from_files(*paths), workload, seed=seed, ca=ca, tracer_provider=tracer_provider)

    @classmethod
    def from_resources(
        cls,
        documents: Iterable[Mapping[str, Any] | Resource],
        *,
        workload: Workload | str | None = None,
        seed: int | None = None,
        ca: CaSource | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> Mesh:
        """A static mesh from parsed documents (dicts as YAML gives them) or resource models."""
        return cls(Snapshot.from_resources(documents), workload, seed=seed, ca=ca, tracer_provider=tracer_provider)

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        workload: Workload | str,
        token: str,
        cache_dir: str | os.PathLike[str] | None = None,
        verify: bool | str | os.PathLike[str] | ssl.SSLContext = True,
        timeout: float = 10.0,
        seed: int | None = None,
        tracer_provider: TracerProvider | None = None,
        keepalive: float = 10.0,
    ) -> Mesh:
        """A live mesh: configuration pushed by the control plane at ``url``, certificate from its CA.

        Waits (without blocking this loop) up to ``timeout`` s for the first snapshot.
        The connection lives in a thread of its own (``mesh.agent``), so the mesh
        outlives this loop: ``asyncio.run(Mesh.connect(...))`` then serving in another
        loop works. If the control plane is unreachable (or silent for ``timeout``), the
        mesh starts from the configuration cached by the last run (logged as stale, with
        its age) and keeps reconnecting; with no cache it raises
        ``ControlPlaneUnavailableError``. A refused token raises ``ControlPlaneAuthError``
        at once. ``mesh.agent.version`` is then the control plane's version in force.

        ``cache_dir`` defaults to ``$MESHLIB_CACHE_DIR/<ns>.<name>`` or
        ``~/.cache/meshlib/<ns>.<name>``; ``verify`` checks an HTTPS control plane (a CA
        bundle path, an SSLContext, or a bool); ``keepalive`` is the control plane's
        keepalive period (a stream silent for three of them is reconnected).
        """
        from .control import Agent

        who = Workload.coerce(workload)

        def build(snapshot: Snapshot, certificates: WorkloadCertificates | None) -> Mesh:
            return cls(snapshot, who, seed=seed, certificates=certificates, tracer_provider=tracer_provider)

        agent = Agent(url, workload=who, token=token, cache_dir=cache_dir, verify=verify, keepalive=keepalive)
        future = agent.start(build)
        waiting = asyncio.wrap_future(future)
        try:
            done, _ = await asyncio.wait({waiting}, timeout=timeout)
        except BaseException:  # the caller was cancelled: leave nothing running
            await asyncio.to_thread(agent.close)
            raise
        if not done:  # neither a configuration nor a refusal in time: the cache, if there is one
            await asyncio.to_thread(
                agent.fall_back_to_cache, f"control plane {url} sent no configuration in {timeout:g} s"
            )
            if not future.done():
                await asyncio.to_thread(agent.close)
                if future.done() and not future.cancelled() and future.exception() is None:
                    future.result().close()  # it arrived as we gave up
                raise agent.unavailable_error()
        if waiting.done() and not waiting.cancelled():
            waiting.exception()  # seen here: future.result() below raises it, without asyncio's "never retrieved"
        try:
            return future.result()  # the thread's future: done even when the timeout raced it
        except BaseException:
            await asyncio.to_thread(agent.close)
            raise

    # -- the configuration in force ----------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self._outbound.snapshot

    @property
    def version(self) -> str:
        """Content hash of the snapshot in force."""
        return self._outbound.snapshot.version

    @property
    def inbound(self) -> Inbound:
        """The server-side engines for the snapshot in force (built on first use: clients never pay for it)."""
        inbound = self._inbound
        snapshot = self._outbound.snapshot
        if inbound is None or inbound.snapshot is not snapshot:
            inbound = self._inbound = Inbound(snapshot, self.workload, previous=inbound)
        return inbound

    @property
    def outbound(self) -> Outbound:
        """The client-side engines for the snapshot in force (adapters read it once per request)."""
        return self._outbound

    def update(self, config: Snapshot | Iterable[Mapping[str, Any] | Resource]) -> str:
        """Swap in a new configuration; a bad one raises PolicyError and changes nothing.

        Returns the new version. Engine state survives for destinations whose
        policy did not change.
        """
        snapshot = config if isinstance(config, Snapshot) else Snapshot.from_resources(config)
        if snapshot.version == self.version:
            return self.version
        outbound = Outbound(snapshot, self.workload, self._rng, previous=self._outbound)
        self.telemetry.reconfigure(snapshot.mesh_config)  # an access log it cannot open raises here: nothing swapped
        self._outbound = outbound
        log.info("meshlib: configuration %s in force", snapshot.version)
        return snapshot.version

    # -- clients -----------------------------------------------------------------

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` whose every call goes through the mesh."""
        from .client import AsyncMeshTransport

        inner = kwargs.pop("transport", None)
        return httpx.AsyncClient(transport=AsyncMeshTransport(self, inner=inner), **kwargs)

    def client(self, **kwargs: Any) -> httpx.Client:
        """The sync twin of :meth:`async_client`."""
        from .client import MeshTransport

        inner = kwargs.pop("transport", None)
        return httpx.Client(transport=MeshTransport(self, inner=inner), **kwargs)

    def __repr__(self) -> str:
        who = self.workload.spiffe_id if self.workload else "anonymous"
        return f"<Mesh {who} version={self.version}>"
