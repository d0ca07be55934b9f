"""``MeshTransport``: the sync twin of ``AsyncMeshTransport``, on the same engines.

The attempt loop is the async one with blocking waits; the per-attempt timeout is
enforced through httpx's own connect/read/write timeouts (a thread cannot be
interrupted mid-call). Mirrors go to a small thread pool and never block the call.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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
from ._async import MAX_MIRRORS_IN_FLIGHT, MIRROR_TIMEOUT
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

if TYPE_CHECKING:
    from ..mesh import Mesh

__all__ = ["MeshTransport"]

log = logging.getLogger("meshlib.client")


class _Chained(httpx.SyncByteStream):
    def __init__(self, head: list[bytes], rest: Iterator[bytes]) -> None:
        self._head = head
        self._rest = rest

    def __iter__(self) -> Iterator[bytes]:
        yield from self._head
        yield from self._rest


class _Releasing(httpx.SyncByteStream):
    """The body of the answer: closing it frees the attempt's pool slot and in-flight count."""

    def __init__(self, stream: httpx.SyncByteStream | httpx.AsyncByteStream, call: Call, attempt: Attempt) -> None:
        self._stream = stream
        self._call = call
        self._attempt = attempt

    def __iter__(self) -> Iterator[bytes]:
        assert isinstance(self._stream, httpx.SyncByteStream)
        yield from self._stream

    def close(self) -> None:
        try:
            if isinstance(self._stream, httpx.SyncByteStream):
                self._stream.close()
        finally:
            self._call.release(self._attempt)


class MeshTransport(httpx.BaseTransport):
    """Routes, balances, retries and limits every request by the mesh's policy (sync)."""

    def __init__(
        self,
        mesh: Mesh,
        inner: httpx.BaseTransport | None = None,
        *,
        replay_limit: int = DEFAULT_REPLAY_LIMIT,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._mesh = mesh
        self._inner = inner if inner is not None else httpx.HTTPTransport()
        self._replay_limit = replay_limit
        self._clock = clock
        self._sleep = sleep
        self._mirror_pool: ThreadPoolExecutor | None = None
        self._mirrors_in_flight = 0
        self._mirror_lock = threading.Lock()
        # One TLS transport per way of reaching endpoints, rebuilt when the certificate rotates;
        # the one it replaces closes at the next rotation (its requests have long finished).
        self._secure: dict[TlsOrigination, tuple[ssl.SSLContext, httpx.HTTPTransport]] = {}
        self._retired: list[httpx.HTTPTransport] = []
        self._source = source_of(mesh)
        self._secure_lock = threading.Lock()

    def _sender(self, step: Attempt, dest: Destination, request: httpx.Request) -> httpx.BaseTransport | None:
        """The transport for this attempt if it speaks TLS (None: plaintext through ``inner``)."""
        tls = step.tls
        if tls is None:
            return None
        context = self._mesh.tls.context_for(tls)
        if context is None:
            return None
        entry = self._secure.get(tls)
        if entry is None or entry[0] is not context:
            with self._secure_lock:
                entry = self._secure.get(tls)
                if entry is None or entry[0] is not context:
                    if entry is not None:
                        for old in self._retired:
                            old.close()
                        self._retired = [entry[1]]
                    entry = self._secure[tls] = (context, httpx.HTTPTransport(verify=context))
        request.extensions["sni_hostname"] = tls.sni or dest.host
        return entry[1]

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        started = self._clock()
        outbound = self._mesh.outbound  # one snapshot for the whole request
        telemetry = self._mesh.telemetry
        replayable = self._buffer(request)
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
            return self._passthrough(request, view, Flight(telemetry, request.method, started))
        if isinstance(plan, LocalReply):
            flight = Flight(telemetry, f"{request.method} {view_host(view)}", started)
            if plan.delay:
                self._sleep(plan.delay)
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
                self._sleep(plan.delay)
            if plan.request_headers:
                request.headers = apply_header_ops(request.headers, plan.request_headers)
            if plan.authority is not None:
                request.headers["host"] = plan.authority
            if plan.mirrors and replayable:
                self._mirror(plan.mirrors, request, plan.path)
            response = self._attempts(call, request, original, plan.path, outbound.deadline_header, flight)
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

    def _passthrough(self, request: httpx.Request, view: RequestView, flight: Flight) -> httpx.Response:
        """A host outside the mesh: sent untouched but for the trace context, reported as PassthroughCluster."""
        span = flight.passthrough(request)
        response: httpx.Response | None = None
        error: BaseException | None = None
        try:
            response = self._inner.handle_request(request)
            return response
        except BaseException as exc:
            error = exc
            raise
        finally:
            status = response.status_code if response is not None else 0
            flight.attempt_done(span, status or None, error)
            flight.finish(self._source, view, PASSTHROUGH_CLUSTER, None, status, error, self._clock(), None, response)

    def _attempts(
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
                self._wait_for_slot(call, step, request)
            if last is not None:
                last.close()
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
                response = sender.handle_request(request)
            except httpx.TransportError as exc:
                flight.attempt_done(span, None, exc)
                end = self._clock()
                verdict = call.finish(step, Outcome.failed(failure_of(exc), duration=end - started), end)
                if verdict.retry:
                    self._sleep(verdict.delay)
                    continue
                if verdict.error is not None:
                    raise verdict.error(
                        f"{call.destination.name}: {verdict.reason} after {step.number} attempt(s); last: {exc}",
                        request=request,
                    ) from exc
                raise
            except BaseException as exc:
                flight.attempt_done(span, None, exc)
                call.abandon(step)  # interrupted, or a bug below us: free the slot, learn nothing
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
            self._sleep(verdict.delay)

    def _wait_for_slot(self, call: Call, attempt: Attempt, request: httpx.Request) -> None:
        """Wait for the destination's pool to admit a queued attempt, within the deadline."""
        pause = 0.0005
        try:
            while not call.promote(attempt, self._clock()):
                if call.deadline is not None and self._clock() >= call.deadline:
                    raise DeadlineExceededError(
                        f"{call.destination.name}: deadline exceeded waiting for a connection-pool slot",
                        request=request,
                    )
                time.sleep(pause)
                pause = min(pause * 2, 0.01)
        except BaseException:
            call.abandon(attempt)  # still queued: leave the queue
            raise

    def _buffer(self, request: httpx.Request) -> bool:
        stream = request.stream
        if isinstance(stream, httpx.ByteStream):
            return True
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._replay_limit:
            return False
        if not isinstance(stream, httpx.SyncByteStream):
            return False
        chunks: list[bytes] = []
        size = 0
        iterator = iter(stream)
        for chunk in iterator:
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
            with self._mirror_lock:
                if self._mirrors_in_flight >= MAX_MIRRORS_IN_FLIGHT:
                    log.debug("mirror to %s dropped: %d copies in flight", dest.name, self._mirrors_in_flight)
                    return
                self._mirrors_in_flight += 1
                if self._mirror_pool is None:
                    self._mirror_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="meshlib-mirror")
                pool = self._mirror_pool
            try:
                pool.submit(self._send_mirror, dest, shadow_request(request, body), path)
            except RuntimeError:  # the transport was closed meanwhile
                with self._mirror_lock:
                    self._mirrors_in_flight -= 1
                return

    def _send_mirror(self, dest: Destination, copy: httpx.Request, path: str | None) -> None:
        """Fire and forget: one attempt, response discarded, errors only logged."""
        try:
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
                    response = (secure or self._inner).handle_request(copy)
                    try:
                        response.read()
                    finally:
                        response.close()
                    outcome = outcome_of(response, started)
                except httpx.TransportError as exc:
                    outcome = Outcome.failed(failure_of(exc), duration=self._clock() - started)
                    log.debug("mirror to %s failed: %r", dest.name, exc)
                except BaseException:
                    call.abandon(step)
                    raise
                call.finish(step, outcome, self._clock())
            finally:
                call.close()
        except Exception:  # pragma: no cover - defensive: a mirror never hurts the caller
            log.exception("mirror to %s failed", dest.name)
        finally:
            with self._mirror_lock:
                self._mirrors_in_flight -= 1

    def close(self) -> None:
        if self._mirror_pool is not None:
            self._mirror_pool.shutdown(wait=False, cancel_futures=True)
        for _, transport in self._secure.values():
            transport.close()
        for transport in self._retired:
            transport.close()
        self._inner.close()
