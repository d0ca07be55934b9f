"""What the async and sync transports share: translating httpx to the engines and back.

No decision is made here: these functions turn an ``httpx.Request`` into the
engine's ``RequestView``, an httpx exception or response into an ``Outcome``, and a
``LocalReply`` into an ``httpx.Response``.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import time
from typing import TYPE_CHECKING

import httpx
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from .._exceptions import RequestPathError, UnknownHostError
from ..engine import (
    Attempt,
    Call,
    Destination,
    Failure,
    HeaderOps,
    LocalReply,
    Outcome,
    RequestView,
    TlsOrigination,
    Verdict,
)
from ..telemetry import RequestRecord, Telemetry, format_trace_id

if TYPE_CHECKING:
    from ..engine import RouteDecision
    from ..mesh import Mesh

__all__ = [
    "DEFAULT_REPLAY_LIMIT",
    "FLAGS_EXTENSION",
    "PASSTHROUGH_CLUSTER",
    "Flight",
    "Source",
    "error_flag",
    "refused",
    "retry_flag",
    "source_of",
    "view_host",
    "apply_header_ops",
    "attach_request",
    "attempt_url",
    "failure_of",
    "local_response",
    "outcome_of",
    "request_view",
    "shadow_request",
    "with_timeouts",
]

DEFAULT_REPLAY_LIMIT = 64 * 1024
"""Bodies up to this size are kept so a retry can resend them (Linkerd's limit)."""

FLAGS_EXTENSION = "meshlib.response_flags"
"""``response.extensions`` key holding Envoy-style response flags (``FI``, ``NR``...)."""


def request_view(request: httpx.Request) -> RequestView:
    url = request.url
    raw = url.raw_path
    cut = raw.find(b"?")
    path = (raw if cut < 0 else raw[:cut]).decode("ascii", "replace")
    headers: dict[str, str] = {}
    for name, value in request.headers.multi_items():
        key = name.lower()
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    authority = headers.get("host") or url.netloc.decode("ascii", "replace")
    return RequestView(request.method, url.scheme, authority, path, url.query.decode("ascii", "replace"), headers)


@functools.lru_cache(maxsize=4096)
def attempt_url(url: httpx.URL, address: str, port: int, path: str | None, secure: bool = False) -> httpx.URL:
    """The URL of one attempt: the endpoint's address, the (maybe rewritten) path, the same query.

    ``secure`` makes it ``https``: the mesh speaks TLS to this endpoint (the
    application wrote plain ``http://reviews/``, as behind a sidecar).

    Cached: httpx re-parses a URL on every ``copy_with`` (the largest single cost of
    an attempt in profiles), and a service calls the same few URLs over and over.
    URLs are immutable, so sharing them is safe.
    """
    if secure and url.scheme != "https":
        url = url.copy_with(scheme="https")
    if path is None:
        return url.copy_with(host=address, port=port)
    query = url.query
    raw = path.encode("ascii") + (b"?" + query if query else b"")
    return url.copy_with(host=address, port=port, raw_path=raw)


def with_timeouts(request: httpx.Request, timeout: float | None, connect_timeout: float) -> None:
    """Bound each network phase of one attempt by its remaining time."""
    current = request.extensions.get("timeout") or {}
    connect = connect_timeout if timeout is None else min(connect_timeout, timeout)
    spec = dict(current)
    spec["connect"] = _min(current.get("connect"), connect)
    for phase in ("read", "write", "pool"):
        spec[phase] = _min(current.get(phase), timeout)
    request.extensions["timeout"] = spec


def _min(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def failure_of(exc: BaseException) -> Failure:
    """Which failure an httpx exception means for retries, outlier detection and breakers."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return Failure.CONNECT_FAILURE
    if isinstance(exc, httpx.PoolTimeout):
        return Failure.OVERFLOW  # our own pool was full: the upstream is not to blame
    if isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout, TimeoutError)):
        return Failure.TIMEOUT
    return Failure.RESET


def outcome_of(response: httpx.Response, started: float, now: float | None = None) -> Outcome:
    retry_after = None
    if response.status_code in (429, 503):
        retry_after = parse_retry_after(response.headers.get("retry-after"))
    end = now if now is not None else time.monotonic()
    return Outcome.response(response.status_code, retry_after=retry_after, duration=end - started)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; garbage is ignored."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def shadow_request(request: httpx.Request, body: bytes) -> httpx.Request:
    """The copy of a request a mirror sends: same method, URL, headers and body; Host gets ``-shadow``.

    Built before the real request goes on, so the copy never sees what its
    attempts change (the URL of an endpoint, the deadline header).
    """
    headers = request.headers.copy()
    name, sep, port = headers.get("host", "").partition(":")
    headers["host"] = f"{name}-shadow{sep}{port}"
    return httpx.Request(request.method, request.url, headers=headers, content=body)


def attach_request(exc: RequestPathError, request: httpx.Request) -> RequestPathError:
    """Engines raise without the httpx request; give it to the error so ``exc.request`` works."""
    try:
        exc.request  # noqa: B018 - the property raises when none is set
    except RuntimeError:
        exc.request = request
    return exc


def local_response(reply: LocalReply, request: httpx.Request) -> httpx.Response:
    headers: list[tuple[str, str]] = [("content-length", str(len(reply.body)))]
    headers.extend(reply.headers)  # the engine's, with the route's response header operations applied
    response = httpx.Response(reply.status, headers=headers, content=reply.body, request=request)
    if reply.flag:
        response.extensions[FLAGS_EXTENSION] = reply.flag
    return response


def apply_header_ops(headers: httpx.Headers, ops: HeaderOps) -> httpx.Headers:
    return httpx.Headers(ops.apply(headers.multi_items()))


# -- telemetry ---------------------------------------------------------------------

log = logging.getLogger("meshlib.client")

PASSTHROUGH_CLUSTER = "PassthroughCluster"
"""``destination_service`` of a request to a host outside the mesh (Istio's name): the label stays bounded."""
BLACKHOLE_CLUSTER = "BlackHoleCluster"
"""``destination_service`` of a request to an unknown host that ``REGISTRY_ONLY`` refused (Istio's name)."""

Source = tuple[str, str, str]
"""This workload's ``(workload, namespace, principal)`` as the source labels of its requests."""


def source_of(mesh: Mesh) -> Source:
    """Computed once per transport: the labels never change for a mesh."""
    workload = mesh.workload
    identity = mesh.identity
    return (
        workload.name if workload is not None else "unknown",
        workload.namespace if workload is not None else "unknown",
        identity.principal if identity is not None else "unknown",
    )


def view_host(view: RequestView) -> str:
    """The host the request named (its authority without the port)."""
    authority = view.authority
    if authority.startswith("["):
        return authority[: authority.find("]") + 1] if "]" in authority else authority
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def retry_flag(verdict: Verdict, call: Call, step: Attempt, outcome: Outcome) -> str:
    """``URX`` when the response returned is the last of a retried request that could not retry again.

    The engine returns such a response with a plain "done" verdict (it is an
    answer, not an error), so the adapter asks the retry policy whether the last
    outcome was one it would have retried.
    """
    if verdict.flag == "URX":
        return "URX"  # the retry budget said no
    retry = call.retry
    if step.number > 1 and step.number > retry.attempts and retry.retriable(outcome):
        return "URX"
    return ""


def refused(
    telemetry: Telemetry, source: Source, view: RequestView, exc: RequestPathError, started: float, now: float
) -> None:
    """A request the mesh refused before any attempt (client rate limit, unknown host): a span and a record."""
    unknown = isinstance(exc, UnknownHostError)
    service = BLACKHOLE_CLUSTER if unknown else view_host(view)
    flight = Flight(telemetry, view.method if unknown else f"{view.method} {service}", started)
    flight.finish(source, view, service, None, 0, exc, now)


def error_flag(exc: BaseException) -> str:
    """Envoy's response flag for a request that ended in ``exc`` (meshlib's errors carry their own)."""
    flag = getattr(exc, "response_flag", "")
    if flag:
        return str(flag)
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return "UF"  # upstream connection failure
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return "UT"
    if isinstance(exc, httpx.TransportError):
        return "UC"  # upstream connection termination
    if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)):
        return "DC"  # the caller gave up: downstream connection termination
    return "-"


@functools.lru_cache(maxsize=256)
def _peer_principal(tls: TlsOrigination) -> str | None:
    """The identity the endpoint proved: the one SPIFFE id the TLS check accepts, if only one."""
    if tls.mode == "SIMPLE" or len(tls.peer_ids) != 1:
        return None
    (peer,) = tls.peer_ids
    return peer[len("spiffe://") :] if peer.startswith("spiffe://") else peer


class Flight:
    """One logical request's telemetry: its CLIENT span, a child span per attempt, one record at the end.

    The attempt span is the parent the upstream sees (its context is what is
    injected). When the span is not sampled, no attribute is computed: the cost
    left is the SDK's sampling decision and the ``traceparent`` header. The record
    is made when the transport returns, that is when the response headers arrived:
    a streamed body's reading time is not in ``duration``.
    """

    __slots__ = ("_parent", "attempts", "flag", "peer", "security", "span", "started", "telemetry", "upstream", "wall")

    def __init__(self, telemetry: Telemetry, name: str, started: float) -> None:
        self.telemetry = telemetry
        self.span = telemetry.tracing.tracer.start_span(name, kind=SpanKind.CLIENT)
        self.started = started
        self.wall = time.time()
        self.attempts = 0
        self.flag = ""
        self.upstream = ""
        self.security: str = "none"
        self.peer: str | None = None
        self._parent: Context | None = None

    def attempt(self, step: Attempt, method: str, headers: httpx.Headers) -> trace.Span:
        """Open the span of one try and write it into the request's propagation headers."""
        parent = self._parent
        if parent is None:
            parent = self._parent = trace.set_span_in_context(self.span)  # keeps the caller's baggage
        upstream = f"{step.address}:{step.port}"
        tracing = self.telemetry.tracing
        span = tracing.tracer.start_span(f"{method} {upstream}", context=parent, kind=SpanKind.CLIENT)
        tls = step.tls
        self.attempts = step.number
        self.upstream = upstream
        if tls is None:
            self.security, self.peer = "none", None
        else:
            self.security = "none" if tls.mode == "SIMPLE" else "mutual_tls"
            self.peer = _peer_principal(tls)
        if span.is_recording():
            attributes: dict[str, str | int] = {
                "meshlib.retry.number": step.number,
                "server.address": step.address,
                "server.port": step.port,
                "network.peer.address": step.address,
            }
            if step.number > 1:
                attributes["http.request.resend_count"] = step.number - 1
            if self.peer is not None:
                attributes["meshlib.peer.identity"] = self.peer
            if tls is not None:
                attributes["meshlib.tls.mode"] = tls.mode
            span.set_attributes(attributes)  # one call: the SDK takes a lock per call
        tracing.propagator.inject(headers, context=trace.set_span_in_context(span, parent))
        return span

    def passthrough(self, request: httpx.Request) -> trace.Span:
        """The one try of a request to a host outside the mesh: its span, its trace context in the headers."""
        parent = self._parent = trace.set_span_in_context(self.span)
        tracing = self.telemetry.tracing
        span = tracing.tracer.start_span(request.method, context=parent, kind=SpanKind.CLIENT)
        self.attempts = 1
        url = request.url
        self.upstream = f"{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"
        if span.is_recording():
            span.set_attribute("meshlib.retry.number", 1)
            span.set_attribute("server.address", url.host)
        tracing.propagator.inject(request.headers, context=trace.set_span_in_context(span, parent))
        return span

    @staticmethod
    def attempt_done(span: trace.Span, status: int | None, error: BaseException | None = None) -> None:
        if span.is_recording():
            if status is not None:
                span.set_attribute("http.response.status_code", status)
                if status >= 400:
                    span.set_status(Status(StatusCode.ERROR))
            if error is not None:
                span.set_attribute("error.type", type(error).__qualname__)
                span.set_status(Status(StatusCode.ERROR, str(error) or type(error).__name__))
        span.end()

    def finish(
        self,
        source: Source,
        view: RequestView,
        service: str,
        dest: Destination | None,
        status: int,
        error: BaseException | None,
        now: float,
        decision: RouteDecision | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        """End the logical span and report the record; never raises into the request path."""
        try:
            self._finish(source, view, service, dest, status, error, now, decision, response)
        except Exception:
            log.exception("meshlib: cannot report a finished request")

    def _finish(
        self,
        source: Source,
        view: RequestView,
        service: str,
        dest: Destination | None,
        status: int,
        error: BaseException | None,
        now: float,
        decision: RouteDecision | None,
        response: httpx.Response | None,
    ) -> None:
        flag = error_flag(error) if error is not None else self.flag or "-"
        span = self.span
        headers = view.headers
        subset = dest.subset if dest is not None else None
        if span.is_recording():
            query = f"?{view.query}" if view.query else ""
            attributes: dict[str, str | int] = {
                "http.request.method": view.method,
                "url.full": f"{view.scheme}://{view.authority}{view.path}{query}",
                "server.address": service,
                "meshlib.attempts": self.attempts,
                "meshlib.response_flags": flag,
            }
            if subset:
                attributes["meshlib.destination.subset"] = subset
            if decision is not None:
                if decision.virtual_service:
                    attributes["meshlib.virtual_service"] = decision.virtual_service
                if decision.route_name:
                    attributes["meshlib.route"] = decision.route_name
                elif decision.route_index is not None:
                    attributes["meshlib.route"] = f"http[{decision.route_index}]"
            if status:
                attributes["http.response.status_code"] = status
            if error is not None:
                attributes["error.type"] = type(error).__qualname__
                span.set_status(Status(StatusCode.ERROR, str(error) or type(error).__name__))
            elif status >= 400:
                span.set_status(Status(StatusCode.ERROR))
            span.set_attributes(attributes)
        span.end()
        service_ns = dest.service.namespace if dest is not None and dest.service is not None else "unknown"
        length = headers.get("content-length", "")
        received = response.headers.get("content-length", "") if response is not None else ""
        self.telemetry.record(
            RequestRecord(
                "source",
                source_workload=source[0],
                source_namespace=source[1],
                source_principal=source[2],
                destination_service=service,
                destination_namespace=service_ns,
                destination_subset=subset or "unknown",
                destination_principal=self.peer or "unknown",
                response_code=status,
                response_flags=flag,
                connection_security_policy="mutual_tls" if self.security == "mutual_tls" else "none",
                start_time=self.wall,
                duration=now - self.started,
                method=view.method,
                path=f"{view.path}?{view.query}" if view.query else view.path,
                authority=view.authority,
                upstream_host=self.upstream,
                attempts=self.attempts,
                bytes_sent=int(length) if length.isdigit() else 0,
                bytes_received=int(received) if received.isdigit() else 0,
                trace_id=format_trace_id(span),
                user_agent=headers.get("user-agent", ""),
                request_id=headers.get("x-request-id", ""),
            )
        )
