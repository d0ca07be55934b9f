"""``Tracing``: the mesh's OpenTelemetry tracer, sampler, exporter and propagators, from MeshConfig.

Each ``Mesh`` gets its own ``TracerProvider`` (resource ``service.name`` = the
workload) rather than the process-wide one: two meshes in one process (tests, a
gateway) keep their own names, sampling and exporters. The sampler is
``ParentBased(TraceIdRatioBased(sampling / 100))``: a new trace is kept with the
configured probability, and a caller's decision (a sampled ``traceparent``) is
always honoured, so a trace is never cut in the middle. Spans are exported over
OTLP/HTTP only when ``otlpEndpoint`` is set; without it they are made (so context
still propagates) but go nowhere.

A provider passed as ``tracer_provider`` (tests, or an application that owns its
OpenTelemetry pipeline) is used as it is: its sampler and its processors decide;
``otlpEndpoint``, if set, adds an exporter to it.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.b3 import B3MultiFormat
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, SamplingResult, TraceIdRatioBased
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from ..policy._meshkinds import TracingSettings

__all__ = ["Tracing", "format_trace_id"]

log = logging.getLogger("meshlib.telemetry")

_SCOPE = "meshlib"


def format_trace_id(span: trace.Span) -> str:
    """The span's trace id as 32 hex digits (what ``traceparent`` and access logs show), or ``""``."""
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


class _MeshSampler(Sampler):
    """``ParentBased(TraceIdRatioBased(ratio))`` whose ratio a new snapshot may change.

    Tracers capture their provider's sampler when made, so the sampler itself is
    what changes on reconfiguration, not the provider.
    """

    def __init__(self, percent: float) -> None:
        self._delegate = self._build(percent)

    @staticmethod
    def _build(percent: float) -> Sampler:
        return ParentBased(TraceIdRatioBased(percent / 100.0))

    def set_percent(self, percent: float) -> None:
        self._delegate = self._build(percent)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        return self._delegate.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"meshlib({self._delegate.get_description()})"


class _Switch(SpanProcessor):
    """A span processor whose target (the OTLP exporter's batch processor, or nothing) can be replaced.

    The SDK cannot remove a processor from a provider; this one stays and
    forwards to whatever the current settings ask for.
    """

    def __init__(self) -> None:
        self._target: SpanProcessor | None = None
        self._lock = threading.Lock()

    def replace(self, target: SpanProcessor | None) -> None:
        with self._lock:
            old, self._target = self._target, target
        if old is not None:
            old.shutdown()  # flushes what it holds

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        target = self._target
        if target is not None:
            target.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        target = self._target
        if target is not None:
            target.on_end(span)

    def shutdown(self) -> None:
        self.replace(None)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        target = self._target
        return target.force_flush(timeout_millis) if target is not None else True


def _exporter_for(endpoint: str) -> SpanProcessor:
    """A batch processor exporting to ``endpoint`` over OTLP/HTTP (``/v1/traces`` added to a bare URL)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    scheme, _, rest = endpoint.partition("://")
    if "/" not in rest.rstrip("/"):
        endpoint = f"{scheme}://{rest.rstrip('/')}/v1/traces"
    return BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))


def _propagator_for(names: Sequence[str]) -> TextMapPropagator:
    parts: list[TextMapPropagator] = []
    for name in names:
        if name == "tracecontext":
            parts += [TraceContextTextMapPropagator(), W3CBaggagePropagator()]
        elif name == "b3":
            parts.append(B3MultiFormat())
    return parts[0] if len(parts) == 1 else CompositePropagator(parts)


class _UnsampledFastPath(trace.Tracer):
    """The SDK's tracer, minus its cost for spans whose parent was not sampled.

    Most requests are not sampled (Istio's default keeps 1%), yet the SDK builds a
    full span for each to find that out. A child of an unsampled parent can only be
    unsampled (``ParentBased``), so it gets a bare non-recording span carrying the
    parent's trace id and a fresh span id: the next hop still sees the decision in
    ``traceparent``. Root spans still go through the sampler.
    """

    def __init__(self, delegate: trace.Tracer, percent: float) -> None:
        self._delegate = delegate
        self.percent = percent
        """Sampling of new traces: at 0 a root span needs no sampler either."""

    def start_span(self, name: str, context: Context | None = None, *args: Any, **kwargs: Any) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        if parent.is_valid:
            if not parent.trace_flags.sampled:
                return trace.NonRecordingSpan(
                    trace.SpanContext(
                        parent.trace_id, _random_span_id(), False, trace.TraceFlags(0), parent.trace_state
                    )
                )
        elif self.percent == 0.0:
            trace_id = random.getrandbits(128) or 1
            return trace.NonRecordingSpan(trace.SpanContext(trace_id, _random_span_id(), False, trace.TraceFlags(0)))
        return self._delegate.start_span(name, context, *args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._delegate.start_as_current_span(*args, **kwargs)


def _random_span_id() -> int:
    return random.getrandbits(64) or 1


class Tracing:
    """One mesh's tracer and propagators; spans are made by the adapters through ``tracer``."""

    def __init__(
        self,
        settings: TracingSettings,
        service_name: str,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        namespace: str | None = None,
    ) -> None:
        self._sampler: _MeshSampler | None = None
        if tracer_provider is None:
            self._sampler = _MeshSampler(settings.sampling)
            resource = {"service.name": service_name}
            if namespace:
                resource["service.namespace"] = namespace
            tracer_provider = TracerProvider(sampler=self._sampler, resource=Resource.create(resource))
            self._owned = True
        else:
            self._owned = False
        self.provider = tracer_provider
        """The provider spans go to (meshlib's own unless one was passed)."""
        tracer = tracer_provider.get_tracer(_SCOPE)
        self.tracer: trace.Tracer = _UnsampledFastPath(tracer, settings.sampling) if self._owned else tracer
        self._export = _Switch()
        if isinstance(tracer_provider, TracerProvider):
            tracer_provider.add_span_processor(self._export)
        elif settings.otlp_endpoint:
            log.warning("meshlib: otlpEndpoint ignored: the tracer provider passed is not the OpenTelemetry SDK's")
        self.settings = settings
        self.propagator = _propagator_for(settings.propagators)
        if settings.otlp_endpoint:
            self._export.replace(_exporter_for(settings.otlp_endpoint))

    def extract(self, headers: Mapping[str, str]) -> Context:
        """The caller's trace context from request headers (lower-case names), as the configured propagators read it."""
        return self.propagator.extract(headers)

    def inject(self, headers: MutableMapping[str, str], span: trace.Span) -> None:
        """Write ``span`` as the parent the next hop sees (``traceparent``, ``b3``... as configured)."""
        self.propagator.inject(headers, context=trace.set_span_in_context(span))

    def reconfigure(self, settings: TracingSettings) -> None:
        """A new snapshot's tracing settings: sampling, exporter and propagators change in place."""
        if settings == self.settings:
            return
        if self._sampler is not None and settings.sampling != self.settings.sampling:
            self._sampler.set_percent(settings.sampling)
            if isinstance(self.tracer, _UnsampledFastPath):
                self.tracer.percent = settings.sampling
        if settings.otlp_endpoint != self.settings.otlp_endpoint:
            self._export.replace(_exporter_for(settings.otlp_endpoint) if settings.otlp_endpoint else None)
        if settings.propagators != self.settings.propagators:
            self.propagator = _propagator_for(settings.propagators)
        self.settings = settings

    def close(self) -> None:
        """Flush and stop the exporter; meshlib's own provider shuts down (a passed one is left alone)."""
        self._export.shutdown()
        if self._owned and isinstance(self.provider, TracerProvider):
            self.provider.shutdown()
