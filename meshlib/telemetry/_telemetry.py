"""``Telemetry``: a mesh's metrics, access log and tracer, configured from MeshConfig.

One per ``Mesh``. Adapters call ``record`` once per finished request (metrics and
the access log line) and use ``tracing`` for spans; engine state (breakers,
ejections, budgets, certificate expiry, config version) is read by a collector at
scrape time, so the hot path pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry

from ..policy._meshkinds import MeshConfigSpec
from ._accesslog import AccessLog
from ._metrics import EngineCollector, RequestMetrics
from ._record import RequestRecord
from ._tracing import Tracing

__all__ = ["Telemetry"]


class Telemetry:
    """What one mesh reports: RED metrics, access logs, traces."""

    def __init__(
        self,
        mesh_config: MeshConfigSpec,
        *,
        service_name: str,
        engine_state: Callable[[], Any] | None = None,
        registry: CollectorRegistry | None = None,
        tracer_provider: TracerProvider | None = None,
        namespace: str | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.metrics = RequestMetrics(self.registry)
        if engine_state is not None:
            self.registry.register(EngineCollector(engine_state))
        self.access_log = AccessLog(mesh_config.access_log)
        self.tracing = Tracing(
            mesh_config.tracing, service_name=service_name, tracer_provider=tracer_provider, namespace=namespace
        )
        self._config = mesh_config

    def record(self, record: RequestRecord) -> None:
        """One finished request: count it, time it, log it."""
        self.metrics.observe(record)
        self.access_log.write(record)

    def reconfigure(self, mesh_config: MeshConfigSpec) -> None:
        """A new snapshot: apply changed access-log and tracing settings (metrics carry on)."""
        if mesh_config.access_log != self._config.access_log:
            old, self.access_log = self.access_log, AccessLog(mesh_config.access_log)  # opened first: may raise
            old.close()
        if mesh_config.tracing != self._config.tracing:
            self.tracing.reconfigure(mesh_config.tracing)
        self._config = mesh_config

    def close(self) -> None:
        """Close the access log and flush the span exporter."""
        self.access_log.close()
        self.tracing.close()
