"""``MeshMiddleware``: the mesh's server-side policy around any ASGI app.

The server request path, in the design's order: normalise the path and check the
method; the peer's identity (the TLS connection ``meshlib.serve`` accepted, or the
``x-forwarded-client-cert`` of the local sidecar, trusted only from the
addresses it is told); PeerAuthentication; AuthorizationPolicy (CUSTOM, DENY,
ALLOW); server rate limits; the caller's deadline; the app. Every decision comes
from ``mesh.inbound``, read once per request: the sidecar's inbound side asks the
same engines.

Lifespan scopes pass through untouched. WebSocket handshakes are authorized and
rate limited like any request (a denied one is closed before it is accepted, which
the server answers with 403): otherwise a DENY on ``/admin`` would not hold for
``ws://…/admin``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .._exceptions import DeadlineExceededError
from ..engine import (
    AuthzDecision,
    AuthzRequest,
    BadPathError,
    CustomCheck,
    Inbound,
    RateDecision,
    RateKeyInputs,
    check_method,
    current_deadline,
    deadline_from_header,
    earliest,
    normalize_path,
)
from ..policy import SpiffeId
from ..policy._hosts import split_host_port
from ..telemetry import RequestRecord, format_trace_id
from ._peer import PeerInfo
from ._xfcc import HEADER as XFCC
from ._xfcc import peer_from_xfcc

if TYPE_CHECKING:
    from ..mesh import Mesh

__all__ = ["CustomHook", "MeshMiddleware", "RequestPrincipalHook"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CustomHook = Callable[[AuthzRequest, CustomCheck], Awaitable[bool]]
"""An external authorizer for CUSTOM policies: True allows, False denies (ext_authz)."""

RequestPrincipalHook = Callable[[Scope], Awaitable[str | None]]
"""Validates the request's credential (a JWT) and returns ``iss/sub``, or None."""

authz_log = logging.getLogger("meshlib.authz")
log = logging.getLogger("meshlib.server")

_DENIED = b"RBAC: access denied"
_MAX_SPOOFERS_REMEMBERED = 4096
"""Addresses whose forged x-forwarded-client-cert was already logged (beyond this, debug only)."""
_XFCC_NAME = XFCC.decode("latin-1")
_PLAINTEXT = b"meshlib: this port requires mutual TLS (PeerAuthentication STRICT)"


class _Exchange:
    """What one request's handling learned, for its span and record."""

    __slots__ = ("decision", "flag", "peer", "sent", "status", "wall")

    def __init__(self, wall: float) -> None:
        self.wall = wall
        self.status = 0
        self.sent = 0
        self.flag = ""
        self.peer: PeerInfo | None = None
        self.decision: AuthzDecision | None = None


class MeshMiddleware:
    """Enforce the mesh's inbound policy on an ASGI app (Starlette, FastAPI, plain ASGI).

    ``trusted_sidecars``: addresses whose ``x-forwarded-client-cert`` header is
    believed (the local meshlib sidecar); from anyone else the header is removed
    before the app sees it. ``custom``: the external check CUSTOM policies call
    (without one, a matching CUSTOM policy denies: fail closed).
    ``request_principal``: a JWT validator for ``requestPrincipals``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        mesh: Mesh,
        trusted_sidecars: Iterable[str] = (),
        custom: CustomHook | None = None,
        request_principal: RequestPrincipalHook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.mesh = mesh
        self.trusted_sidecars = frozenset(trusted_sidecars)
        self.custom = custom
        self.request_principal = request_principal
        self._clock = clock
        self._spoofers: set[str] = set()
        workload = mesh.workload
        identity = mesh.identity
        self._destination = (
            workload.name if workload is not None else "unknown",
            workload.namespace if workload is not None else "unknown",
            workload.labels.get("version", "unknown") if workload is not None else "unknown",
            identity.principal if identity is not None else "unknown",
            # Istio's destination_service is the service's host; meshlib takes the service to be named
            # like the workload (no registry lookup per request), as the callers' canonical host names it.
            f"{workload.name}.{workload.namespace}.svc.cluster.local" if workload is not None else "unknown",
        )
        """This workload's labels as the destination of what it serves: computed once."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        started = self._clock()
        headers: dict[str, str] = {}
        xfcc = False
        for name, value in scope["headers"]:
            key = name.decode("latin-1").lower()
            if key == _XFCC_NAME:  # in any case: a spoofed header the check missed would reach the app
                xfcc = True
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]},{text}" if key in headers else text
        telemetry = self.mesh.telemetry
        tracing = telemetry.tracing
        parent = tracing.extract(headers)
        method = scope.get("method", "GET")
        span = tracing.tracer.start_span(method, context=parent, kind=SpanKind.SERVER)
        token = otel_context.attach(trace.set_span_in_context(span, parent))  # the app's mesh calls are children
        exchange = _Exchange(time.time())

        async def sending(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                exchange.status = message["status"]
            elif kind == "http.response.body":
                exchange.sent += len(message.get("body", b""))
            elif kind == "websocket.accept":
                exchange.status = 101
            elif kind == "websocket.close" and not exchange.status:
                exchange.status = 403  # closed before the handshake was accepted: the server answers 403
            await send(message)

        error: BaseException | None = None
        try:
            await self._handle(scope, receive, sending, headers, xfcc, exchange)
        except asyncio.CancelledError as exc:
            exchange.flag = exchange.flag or "DC"  # the server gave up on the request: the client went away
            error = exc
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            otel_context.detach(token)
            self._report(scope, headers, span, exchange, error, started)

    def _report(
        self,
        scope: Scope,
        headers: dict[str, str],
        span: trace.Span,
        exchange: _Exchange,
        error: BaseException | None,
        started: float,
    ) -> None:
        """End the SERVER span and report the record (reporter ``destination``); never raises."""
        try:
            status = exchange.status
            if not status and error is not None and not isinstance(error, asyncio.CancelledError):
                status = 500  # the app raised before answering: the server answers 500
            peer = exchange.peer
            spiffe = peer.spiffe_id if peer is not None else None
            decision = exchange.decision
            query = scope.get("query_string") or b""
            raw = scope.get("raw_path") or scope["path"].encode("utf-8")
            path = (raw + b"?" + query if query else raw).decode("latin-1")
            flag = exchange.flag or "-"
            if span.is_recording():
                attributes: dict[str, str | int | bool] = {
                    "http.request.method": scope.get("method", "GET"),
                    "url.path": scope["path"],
                    "url.scheme": scope.get("scheme", "http"),
                    "meshlib.workload": self._destination[0],
                    "meshlib.response_flags": flag,
                }
                client = scope.get("client")
                if client:
                    attributes["client.address"] = client[0]
                if spiffe is not None:
                    attributes["meshlib.peer.principal"] = spiffe.principal
                if decision is not None:
                    if decision.policy:
                        attributes["meshlib.authz.policy"] = decision.policy
                    if decision.audit:
                        attributes["meshlib.authz.audit"] = decision.audit
                    attributes["meshlib.authz.allowed"] = decision.allowed
                if status:
                    attributes["http.response.status_code"] = status
                if status >= 500 or (error is not None and not status):
                    span.set_status(Status(StatusCode.ERROR))  # a 4xx is the client's error, not the server's
                if error is not None:
                    attributes["error.type"] = type(error).__qualname__
                span.set_attributes(attributes)  # one call: the SDK takes a lock per call
            span.end()
            server = scope.get("server")
            length = headers.get("content-length", "")
            dest = self._destination
            self.mesh.telemetry.record(
                RequestRecord(
                    "destination",
                    # No metadata exchange: the peer's service account stands for its workload name.
                    source_workload=spiffe.service_account if spiffe is not None else "unknown",
                    source_namespace=spiffe.namespace if spiffe is not None else "unknown",
                    source_principal=spiffe.principal if spiffe is not None else "unknown",
                    destination_service=dest[4],
                    destination_workload=dest[0],
                    destination_namespace=dest[1],
                    destination_subset=dest[2],
                    destination_principal=dest[3],
                    response_code=status,
                    response_flags=flag,
                    connection_security_policy="mutual_tls" if peer is not None and peer.mtls else "none",
                    start_time=exchange.wall,
                    duration=self._clock() - started,
                    method=scope.get("method", "GET"),
                    path=path,
                    authority=headers.get("host", ""),
                    upstream_host=f"{server[0]}:{server[1]}" if server else "",
                    bytes_received=int(length) if length.isdigit() else 0,
                    bytes_sent=exchange.sent,
                    authz_policy=decision.policy or "" if decision is not None else "",
                    audit=decision.audit or "" if decision is not None else "",
                    trace_id=format_trace_id(span),
                    user_agent=headers.get("user-agent", ""),
                    request_id=headers.get("x-request-id", ""),
                )
            )
        except Exception:
            log.exception("meshlib: cannot report a finished request")

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], xfcc: bool, exchange: _Exchange
    ) -> None:
        inbound: Inbound = self.mesh.inbound  # one snapshot for the whole request
        method = scope.get("method", "GET")
        if not check_method(method):
            await _reply(scope, receive, send, 400, b"meshlib: the method must be upper case")
            return
        raw = scope.get("raw_path") or scope["path"].encode("utf-8")
        try:
            path = normalize_path(raw.decode("latin-1"), inbound.path_normalization)
        except BadPathError as exc:
            await _reply(scope, receive, send, 400, f"meshlib: {exc}".encode())
            return
        client = scope.get("client")
        source_ip = client[0] if client else ""
        peer = exchange.peer = self._peer(scope, headers, source_ip, xfcc)
        server = scope.get("server")
        port = int(server[1]) if server and server[1] is not None else 0
        destination_ip = server[0] if server else None
        if inbound.mtls.mode_for(port or None) == "STRICT" and not peer.mtls:
            log.warning("meshlib: refused a plaintext request from %s: PeerAuthentication STRICT", source_ip)
            await _reply(scope, receive, send, 400, _PLAINTEXT)
            return

        principal = peer.spiffe_id.principal if peer.spiffe_id is not None else None
        request_principal = await self.request_principal(scope) if self.request_principal is not None else None
        host = headers.get("host", "")
        request = AuthzRequest(
            principal=principal,
            source_ip=source_ip,
            remote_ip=source_ip,
            request_principal=request_principal,
            host=split_host_port(host)[0],
            port=port,
            method=method,
            path=path,
            headers=headers,
            destination_ip=destination_ip,
            sni=None if peer.mtls else "",
        )
        checks = inbound.authorizer.custom(request)
        decision = await self._custom(checks, request) if checks else None
        if decision is None:
            decision = inbound.authorizer.decide(request)
        else:
            exchange.flag = "UAEX"  # refused by the external authorizer (Envoy's ext_authz flag)
        exchange.decision = decision
        extensions = scope.get("extensions")
        if extensions is None:  # absent, or None as some servers leave it
            extensions = scope["extensions"] = {}
        extensions["meshlib.authz"] = decision
        who = principal or source_ip
        if decision.audit is not None:  # audited whatever the answer, as Istio's AUDIT action
            authz_log.info("AUDIT %s: %s %s from %s", decision.audit, method, path, who)
        if decision.shadow:  # dry-run policies: evaluated and logged, never enforced
            authz_log.info(
                "dry-run policies would %s %s %s from %s: %s",
                "deny" if decision.shadow_denied else "allow",
                method,
                path,
                who,
                ", ".join(f"{s.policy} ({s.action}) {'matched' if s.matched else 'no match'}" for s in decision.shadow),
            )
        if not decision.allowed:
            authz_log.info("RBAC: access denied: %s %s from %s: %s", method, path, who, decision.reason)
            await _reply(scope, receive, send, 403, _DENIED)
            return

        if inbound.limits:
            inputs = RateKeyInputs(
                method,
                path,
                headers,
                principal=principal,
                namespace=peer.spiffe_id.namespace if peer.spiffe_id is not None else None,
                remote_ip=source_ip,
            )
            check = inbound.limits.check
            # A Redis-backed limit does network IO: keep it off the event loop.
            limited = await asyncio.to_thread(check, inputs) if inbound.limits.remote else check(inputs)
            if not limited.allowed:
                exchange.flag = "RL"
                await _reply(scope, receive, send, 429, b"meshlib: rate limited", _limit_headers(limited))
                return

        now = self._clock()
        deadline = None
        if inbound.deadline_header is not None:
            deadline = deadline_from_header(headers.get(inbound.deadline_header), now)
        if deadline is not None and deadline <= now:
            exchange.flag = "UT"
            await _reply(scope, receive, send, 504, b"meshlib: the caller's deadline has passed")
            return
        deadline = earliest(deadline, current_deadline.get())
        extensions["meshlib.deadline"] = deadline

        if path.encode("latin-1") != raw:  # what the policies saw is what the app gets
            scope = dict(scope)
            scope["raw_path"] = path.encode("latin-1")
            scope["path"] = unquote(path)
        token = current_deadline.set(deadline)
        try:
            if deadline is None:
                await self.app(scope, receive, send)
            else:
                await self._within(deadline, now, scope, receive, send, exchange)
        finally:
            current_deadline.reset(token)

    def _peer(self, scope: Scope, headers: dict[str, str], source_ip: str, xfcc: bool) -> PeerInfo:
        """Who is calling: the TLS peer, or the trusted sidecar's forwarded certificate."""
        extensions = scope.get("extensions") or {}
        tls_peer = extensions.get("meshlib.peer")
        if isinstance(tls_peer, PeerInfo) and tls_peer.mtls:
            if xfcc:
                _drop_header(scope, XFCC)  # a TLS peer speaks for itself
                headers.pop("x-forwarded-client-cert", None)
            return tls_peer
        if xfcc:
            if source_ip in self.trusted_sidecars:
                spiffe: SpiffeId | None = peer_from_xfcc(headers["x-forwarded-client-cert"])
                return PeerInfo(spiffe, spiffe is not None)
            # Once per address: a caller sending the header on every request must not flood the log.
            if source_ip not in self._spoofers and len(self._spoofers) < _MAX_SPOOFERS_REMEMBERED:
                self._spoofers.add(source_ip)
                log.warning(
                    "meshlib: ignored x-forwarded-client-cert from %s, which is not a trusted sidecar "
                    "(logged once per address)",
                    source_ip,
                )
            else:
                log.debug("meshlib: ignored x-forwarded-client-cert from %s", source_ip)
            _drop_header(scope, XFCC)
            headers.pop("x-forwarded-client-cert", None)
        return tls_peer if isinstance(tls_peer, PeerInfo) else PeerInfo(None, False)

    async def _custom(self, checks: tuple[CustomCheck, ...], request: AuthzRequest) -> AuthzDecision | None:
        """Ask the external authorizer about each matching CUSTOM policy: a refusal decides, else None."""
        for check in checks:
            if self.custom is None:
                authz_log.error(
                    "meshlib: %s asks provider %s but MeshMiddleware has no custom= hook: denying",
                    check.policy,
                    check.provider,
                )
                return AuthzDecision(False, check.policy, f"CUSTOM provider {check.provider} has no hook")
            try:
                allowed = await self.custom(request, check)
            except Exception as exc:  # an unreachable authorizer fails closed, as ext_authz does by default
                authz_log.error("meshlib: CUSTOM provider %s failed (%r): denying", check.provider, exc)
                allowed = False
            if not allowed:
                return AuthzDecision.denied_by_custom(check)
        return None

    async def _within(
        self, deadline: float, now: float, scope: Scope, receive: Receive, send: Send, exchange: _Exchange
    ) -> None:
        """Run the app until the caller's deadline; past it, answer 504 if nothing was sent yet.

        The app's own mesh calls inherit the deadline (``current_deadline``), so its
        client may give up first, a hair before this timer, and raise
        DeadlineExceededError: the caller's deadline has passed all the same, and the
        answer is the same 504, not the 500 of an app error.
        """
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            if message["type"] in ("http.response.start", "websocket.accept"):
                started = True
            await send(message)

        timeout = asyncio.timeout(deadline - now)
        try:
            async with timeout:
                await self.app(scope, receive, tracking)
        except DeadlineExceededError as exc:
            if started or scope["type"] != "http" or not exc.from_caller:
                raise  # the app's own, shorter timeout: its error to answer
            log.info("meshlib: %s %s: the app's calls ran out of the caller's deadline", scope["method"], scope["path"])
            exchange.flag = "UT"
            await _reply(scope, receive, send, 504, b"meshlib: the caller's deadline has passed")
        except TimeoutError:
            if not timeout.expired():
                raise  # the app's own TimeoutError, not the caller's deadline: no 504 for it
            log.info("meshlib: %s %s stopped at the caller's deadline", scope.get("method"), scope.get("path"))
            if not started and scope["type"] == "http":
                exchange.flag = "UT"
                await _reply(scope, receive, send, 504, b"meshlib: the caller's deadline has passed")


def _drop_header(scope: Scope, name: bytes) -> None:
    scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != name]


def _limit_headers(decision: RateDecision) -> list[tuple[bytes, bytes]]:
    reset = max(1, math.ceil(decision.retry_after))
    seconds = str(reset).encode()
    out = [(b"retry-after", seconds), (b"x-ratelimit-remaining", b"0"), (b"x-ratelimit-reset", seconds)]
    if decision.amount:
        window = f";w={int(decision.window)}" if decision.window else ""
        out.append((b"x-ratelimit-limit", f"{decision.amount}{window}".encode()))
    if decision.storage_failed:
        out.append((b"x-meshlib-ratelimit", b"storage-unavailable"))
    return out


async def _reply(
    scope: Scope, receive: Receive, send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """A local answer: plain text over HTTP; for a WebSocket handshake, a close before accept (HTTP 403)."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1013 if status == 429 else 1008})
        return
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
