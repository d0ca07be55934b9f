"""``AsyncMeshTransport``: the mesh in an ``httpx.AsyncClient``.

It runs the engines' plan (``Outbound.plan``) and the attempt loop of a ``Call``,
doing only the IO: waiting, sending through the inner transport, timing out an
attempt. Compose it with your own client, or get one from ``mesh.async_client()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import httpx

from .._exceptions import DeadlineExceededError, RequestPathError
from ..engine import (
    Attempt,
    Call,
    Destination,
    LocalReply,
    Outcome,
    Passthrough,
    Proceed,
    Refusal,
    RequestView,
    RetryPolicy,
    TlsOrigination,
    current_deadline,
    deadline_to_header,
)
from ._common import (
    DEFAULT_REPLAY_LIMIT,
    PASSTHROUGH_CLUSTER,
    Flight,
    apply_header_ops,
    attach_request,
    attempt_url,
    failure_of,
    local_response,
    outcome_of,
    refused,
    request_view,
    retry_flag,
    shadow_request,
    source_of,
    view_host,
    with_timeouts,
)
from ._fasthttp import FastAsyncTransport

if TYPE_CHECKING:
    from ..mesh import Mesh

__all__ = ["AsyncMeshTransport"]

log = logging.getLogger("meshlib.client")

MAX_MIRRORS_IN_FLIGHT = 64
"""Mirrored copies beyond this many in flight are dropped: a shadow must never hurt the real path."""

MIRROR_TIMEOUT = 5.0
"""Seconds a mirrored copy may take before it is given up."""


class _Chained(httpx.AsyncByteStream):
    """A body whose first chunks were read to try buffering it, followed by the rest."""

    def __init__(self, head: list[bytes], rest: AsyncIterator[bytes]) -> None:
        self._head = head
        self._rest = rest

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._head:
            yield chunk
        async for chunk in self._rest:
            yield chunk


class _Releasing(httpx.AsyncByteStream):
    """The body of the answer: closing it frees the attempt's pool slot and in-flight count."""

    def __init__(self, stream: httpx.AsyncByteStream | httpx.SyncByteStream, call: Call, attempt: Attempt) -> None:
        self._stream = stream
        self._call = call
        self._attempt = attempt

    async def __aiter__(self) -> AsyncIterator[bytes]:
        assert isinstance(self._stream, httpx.AsyncByteStream)
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            if isinstance(self._stream, httpx.AsyncByteStream):
                await self._stream.aclose()
        finally:
            self._call.release(self._attempt)


class AsyncMeshTransport(httpx.AsyncBaseTransport):
    """Routes, balances, retries and limits every request by the mesh's policy.

    ``inner`` sends the attempts (default: meshlib's ``FastAsyncTransport``, HTTP/1.1
    with a keep-alive pool per origin, raising httpx's own exceptions; pass
    ``httpx.AsyncHTTPTransport()`` for HTTP/2 or proxies); a host outside the mesh
    goes to it untouched. Bodies up to ``replay_limit`` bytes are
    kept so retries can resend them; a longer streamed body is sent once.
    """

    def __init__(
        self,
        mesh: Mesh,
        inner: httpx.AsyncBaseTransport | None = None,
        *,
        replay_limit: int = DEFAULT_REPLAY_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._mesh = mesh
        self._inner = inner if inner is not None else FastAsyncTransport()
        self._replay_limit = replay_limit
        self._clock = clock
        self._mirrors: set[asyncio.Task[None]] = set()
        # One TLS transport per way of reaching endpoints (ISTIO_MUTUAL to an identity, SIMPLE...):
        # each keeps its own pool, so a connection is never reused with another peer check.
        self._secure: dict[TlsOrigination, FastAsyncTransport] = {}
        self._source = source_of(mesh)

    def _sender(self, step: Attempt, dest: Destination, request: httpx.Request) -> httpx.AsyncBaseTransport | None:
        """The transport for this attempt if it speaks TLS (None: plaintext through ``inner``)."""
        tls = step.tls
        if tls is None:
            return None
        context = self._mesh.tls.context_for(tls)
        if context is None:
            return None
        transport = self._secure.get(tls)
        if transport is None:
            transport = self._secure[tls] = FastAsyncTransport(ssl_context=context)
        elif transport.ssl_context is not context:
            transport.set_ssl_context(context)  # the certificate rotated: new connections use the new one
        request.extensions["sni_hostname"] = tls.sni or dest.host
        return transport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        started = self._clock()
        outbound = self._mesh.outbound  # one snapshot for the whole request
        telemetry = self._mesh.telemetry
        replayable = await self._buffer(request)
        view = request_view(request)
        caller = current_deadline.get()
        try:
            plan = outbound.plan(view, started, replayable=replayable, caller_deadline=caller)
        except RequestPathError as exc:
            if isinstance(exc, DeadlineExceededError) and caller is not None:
                exc.from_caller = True  # it had passed before the plan: only the caller's can have
            refused(telemetry, self._source, view, exc, started, self._clock())
            raise attach_request(exc, request) from None
        if isinstance(plan, Passthrough):
            return await self._passthrough(request, view, Flight(telemetry, request.method, started))
        if isinstance(plan, LocalReply):
            flight = Flight(telemetry, f"{request.method} {view_host(view)}", started)
            if plan.delay:
                await asyncio.sleep(plan.delay)
            flight.flag = plan.flag
            reply = local_response(plan, request)
            flight.finish(self._source, view, view_host(view), None, plan.status, None, self._clock(), plan.decision)
            return reply
        assert isinstance(plan, Proceed)
        original = request.url
        call = plan.call
        dest = call.destination
        flight = Flight(telemetry, f"{request.method} {dest.host}", started)
        response: httpx.Response | None = None
        error: BaseException | None = None
        try:
            if plan.delay:
                await asyncio.sleep(plan.delay)
            if plan.request_headers:
                request.headers = apply_header_ops(request.headers, plan.request_headers)
            if plan.authority is not None:
                request.headers["host"] = plan.authority
            if plan.mirrors and replayable:
                self._mirror(plan.mirrors, request, plan.path)
            response = await self._attempts(call, request, original, plan.path, outbound.deadline_header, flight)
            if plan.response_headers:
                response.headers = apply_header_ops(response.headers, plan.response_headers)
            return response
        except BaseException as exc:
            error = exc
            if isinstance(exc, DeadlineExceededError) and caller is not None and call.deadline is not None:
                exc.from_caller = call.deadline >= caller  # the caller's deadline, not a shorter route timeout
            raise
        finally:
            request.url = original
            call.close()
            status = response.status_code if response is not None else 0
            flight.finish(self._source, view, dest.host, dest, status, error, self._clock(), plan.decision, response)

    async def _passthrough(self, request: httpx.Request, view: RequestView, flight: Flight) -> httpx.Response:
        """A host outside the mesh: sent untouched but for the trace context, reported as PassthroughCluster."""
        span = flight.passthrough(request)
        response: httpx.Response | None = None
        error: BaseException | None = None
        try:
            response = await self._inner.handle_async_request(request)
            return response
        except BaseException as exc:
            error = exc
            raise
        finally:
            status = response.status_code if response is not None else 0
            flight.attempt_done(span, status or None, error)
            flight.finish(self._source, view, PASSTHROUGH_CLUSTER, None, status, error, self._clock(), None, response)

    async def _attempts(
        self,
        call: Call,
        request: httpx.Request,
        original: httpx.URL,
        path: str | None,
        deadline_header: str | None,
        flight: Flight,
    ) -> httpx.Response:
        last: httpx.Response | None = None
        while True:
            step = call.next_attempt(self._clock())
            if isinstance(step, Refusal):
                if last is not None:
                    flight.flag = step.flag
                    return last  # Envoy answers with the last response when it cannot retry
                raise step.error(step.message, request=request)
            if step.queued:
                await self._wait_for_slot(call, step, request)
            if last is not None:
                await last.aclose()
                last = None
            try:
                secure = self._sender(step, call.destination, request)
            except RequestPathError as exc:
                call.abandon(step)
                raise attach_request(exc, request) from None
            request.url = attempt_url(original, step.address, step.port, path, secure is not None)
            sender = secure or self._inner
            if step.close_connection:
                request.headers["connection"] = "close"  # maxRequestsPerConnection: 1
            with_timeouts(request, step.timeout, call.destination.pool.connect_timeout)
            span = flight.attempt(step, request.method, request.headers)
            started = self._clock()
            if call.deadline is not None and deadline_header is not None:
                request.headers[deadline_header] = deadline_to_header(call.deadline, started)
            try:
                async with asyncio.timeout(step.timeout):
                    response = await sender.handle_async_request(request)
            except (httpx.TransportError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError):
                    exc = httpx.ReadTimeout(
                        f"attempt {step.number} timed out after {step.timeout:.3f}s", request=request
                    )
                flight.attempt_done(span, None, exc)
                end = self._clock()
                verdict = call.finish(step, Outcome.failed(failure_of(exc), duration=end - started), end)
                if verdict.retry:
                    await asyncio.sleep(verdict.delay)
                    continue
                if verdict.error is not None:
                    raise verdict.error(
                        f"{call.destination.name}: {verdict.reason} after {step.number} attempt(s); last: {exc}",
                        request=request,
                    ) from exc
                raise exc from None
            except BaseException as exc:
                flight.attempt_done(span, None, exc)
                call.abandon(step)  # cancelled, or a bug below us: free the slot, learn nothing
                raise
            flight.attempt_done(span, response.status_code)
            end = self._clock()
            outcome = outcome_of(response, started, end)
            verdict = call.finish(step, outcome, end, hold=True)
            if not verdict.retry:
                flight.flag = retry_flag(verdict, call, step, outcome)
                if step.held is not None:
                    response.stream = _Releasing(response.stream, call, step)
                return response
            last = response
            await asyncio.sleep(verdict.delay)

    async def _wait_for_slot(self, call: Call, attempt: Attempt, request: httpx.Request) -> None:
        """Wait for the destination's pool to admit a queued attempt, within the deadline."""
        pause = 0.0005
        try:
            while not call.promote(attempt, self._clock()):
                if call.deadline is not None and self._clock() >= call.deadline:
                    raise DeadlineExceededError(
                        f"{call.destination.name}: deadline exceeded waiting for a connection-pool slot",
                        request=request,
                    )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.01)
        except BaseException:
            call.abandon(attempt)  # still queued: leave the queue
            raise

    async def _buffer(self, request: httpx.Request) -> bool:
        """Keep the body so it can be resent: whole when small, else stream it once."""
        stream = request.stream
        if isinstance(stream, httpx.ByteStream):
            return True
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._replay_limit:
            return False
        if not isinstance(stream, httpx.AsyncByteStream):
            return False
        chunks: list[bytes] = []
        size = 0
        iterator = stream.__aiter__()
        async for chunk in iterator:
            chunks.append(chunk)
            size += len(chunk)
            if size > self._replay_limit:
                request.stream = _Chained(chunks, iterator)
                return False
        request.stream = httpx.ByteStream(b"".join(chunks))
        return True

    def _mirror(self, destinations: tuple[Destination, ...], request: httpx.Request, path: str | None) -> None:
        body = b"".join(request.stream) if isinstance(request.stream, httpx.ByteStream) else b""
        for dest in destinations:
            if len(self._mirrors) >= MAX_MIRRORS_IN_FLIGHT:
                log.debug("mirror to %s dropped: %d copies in flight", dest.name, len(self._mirrors))
                return
            copy = shadow_request(request, body)  # now: the real request's attempts will change it
            task = asyncio.get_running_loop().create_task(self._send_mirror(dest, copy, path))
            self._mirrors.add(task)
            task.add_done_callback(self._mirrors.discard)

    async def _send_mirror(self, dest: Destination, copy: httpx.Request, path: str | None) -> None:
        """Fire and forget: one attempt, response discarded, errors only logged."""
        now = self._clock()
        call = Call(
            dest,
            RetryPolicy(),
            method=copy.method,
            replayable=True,
            deadline=None,
            now=now,
            rng=self._mesh.outbound.rng,
        )
        try:
            step = call.next_attempt(now)
            if isinstance(step, Refusal):
                return
            if step.queued:
                call.abandon(step)  # a shadow never waits for a slot
                return
            started = self._clock()
            try:
                secure = self._sender(step, dest, copy)
                copy.url = attempt_url(copy.url, step.address, step.port, path, secure is not None)
                if step.close_connection:
                    copy.headers["connection"] = "close"
                with_timeouts(copy, MIRROR_TIMEOUT, dest.pool.connect_timeout)
                async with asyncio.timeout(MIRROR_TIMEOUT):
                    response = await (secure or self._inner).handle_async_request(copy)
                    await response.aread()
                await response.aclose()
                outcome = outcome_of(response, started)
            except (httpx.TransportError, TimeoutError) as exc:
                outcome = Outcome.failed(failure_of(exc), duration=self._clock() - started)
                log.debug("mirror to %s failed: %r", dest.name, exc)
            except BaseException:
                call.abandon(step)
                raise
            call.finish(step, outcome, self._clock())
        finally:
            call.close()

    async def aclose(self) -> None:
        for task in list(self._mirrors):
            task.cancel()
        for transport in self._secure.values():
            await transport.aclose()
        await self._inner.aclose()
