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
    DEADLINE_HEADER,
    Attempt,
    Call,
    Destination,
    LocalReply,
    Outcome,
    Passthrough,
    Proceed,
    Refusal,
    RetryPolicy,
    current_deadline,
    deadline_to_header,
)
from ._common import (
    DEFAULT_REPLAY_LIMIT,
    apply_header_ops,
    attempt_url,
    failure_of,
    local_response,
    outcome_of,
    request_view,
    with_timeouts,
)

if TYPE_CHECKING:
    from ..mesh import Mesh

__all__ = ["AsyncMeshTransport"]

log = logging.getLogger("meshlib.client")

MAX_MIRRORS_IN_FLIGHT = 64
"""Mirrored copies beyond this many in flight are dropped: a shadow must never hurt the real path."""


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


class AsyncMeshTransport(httpx.AsyncBaseTransport):
    """Routes, balances, retries and limits every request by the mesh's policy.

    ``inner`` sends the attempts (default: ``httpx.AsyncHTTPTransport()``); a host
    outside the mesh goes to it untouched. Bodies up to ``replay_limit`` bytes are
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
        self._inner = inner if inner is not None else httpx.AsyncHTTPTransport()
        self._replay_limit = replay_limit
        self._clock = clock
        self._mirrors: set[asyncio.Task[None]] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        outbound = self._mesh.outbound  # one snapshot for the whole request
        replayable = await self._buffer(request)
        plan = outbound.plan(
            request_view(request), self._clock(), replayable=replayable, caller_deadline=current_deadline.get()
        )
        if isinstance(plan, Passthrough):
            return await self._inner.handle_async_request(request)
        if isinstance(plan, LocalReply):
            return local_response(plan, request)
        assert isinstance(plan, Proceed)
        original = request.url
        try:
            if plan.delay:
                await asyncio.sleep(plan.delay)
            if plan.request_headers:
                request.headers = apply_header_ops(request.headers, plan.request_headers)
            if plan.authority is not None:
                request.headers["host"] = plan.authority
            if plan.mirrors and replayable:
                self._mirror(plan.mirrors, request, plan.path)
            response = await self._attempts(plan.call, request, original, plan.path)
            if plan.response_headers:
                response.headers = apply_header_ops(response.headers, plan.response_headers)
            return response
        finally:
            request.url = original
            plan.call.close()

    async def _attempts(
        self, call: Call, request: httpx.Request, original: httpx.URL, path: str | None
    ) -> httpx.Response:
        last: httpx.Response | None = None
        while True:
            now = self._clock()
            step = call.next_attempt(now)
            if isinstance(step, Refusal):
                if last is not None:
                    return last  # Envoy answers with the last response when it cannot retry
                raise step.error(step.message, request=request)
            if step.queued:
                await self._wait_for_slot(call, step, request)
            if last is not None:
                await last.aclose()
                last = None
            request.url = attempt_url(original, step.address, step.port, path)
            with_timeouts(request, step.timeout, call.destination.pool.connect_timeout)
            if call.deadline is not None:
                request.headers[DEADLINE_HEADER] = deadline_to_header(call.deadline, now)
            started = self._clock()
            try:
                async with asyncio.timeout(step.timeout):
                    response = await self._inner.handle_async_request(request)
            except asyncio.CancelledError:
                call.abandon(step)
                raise
            except (httpx.TransportError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError):
                    exc = httpx.ReadTimeout(
                        f"attempt {step.number} timed out after {step.timeout:.3f}s", request=request
                    )
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
            end = self._clock()
            verdict = call.finish(step, outcome_of(response, started, end), end)
            if not verdict.retry:
                return response
            last = response
            await asyncio.sleep(verdict.delay)

    async def _wait_for_slot(self, call: Call, attempt: Attempt, request: httpx.Request) -> None:
        """Wait for the destination's pool to admit a queued attempt, within the deadline."""
        pause = 0.0005
        while not call.promote(attempt, self._clock()):
            if call.deadline is not None and self._clock() >= call.deadline:
                call.abandon(attempt)
                raise DeadlineExceededError(
                    f"{call.destination.name}: deadline exceeded waiting for a connection-pool slot", request=request
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.01)

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
        for dest in destinations:
            if len(self._mirrors) >= MAX_MIRRORS_IN_FLIGHT:
                log.debug("mirror to %s dropped: %d copies in flight", dest.name, len(self._mirrors))
                return
            task = asyncio.get_running_loop().create_task(self._send_mirror(dest, request, path))
            self._mirrors.add(task)
            task.add_done_callback(self._mirrors.discard)

    async def _send_mirror(self, dest: Destination, request: httpx.Request, path: str | None) -> None:
        """Fire and forget: one attempt, response discarded, errors only logged."""
        outbound = self._mesh.outbound
        now = self._clock()
        call = Call(
            dest, RetryPolicy(), method=request.method, replayable=True, deadline=None, now=now, rng=outbound.rng
        )
        try:
            step = call.next_attempt(now)
            if isinstance(step, Refusal) or step.queued:
                if isinstance(step, Attempt):
                    call.abandon(step)
                return
            host = request.headers.get("host", "")
            headers = request.headers.copy()
            headers["host"] = f"{host.split(':', 1)[0]}-shadow" + (f":{host.split(':', 1)[1]}" if ":" in host else "")
            copy = httpx.Request(
                request.method,
                attempt_url(request.url, step.address, step.port, path),
                headers=headers,
                content=b"".join(request.stream) if isinstance(request.stream, httpx.ByteStream) else b"",
            )
            with_timeouts(copy, 5.0, dest.pool.connect_timeout)
            started = self._clock()
            try:
                response = await self._inner.handle_async_request(copy)
                await response.aread()
                await response.aclose()
                outcome = outcome_of(response, started)
            except (httpx.TransportError, TimeoutError) as exc:
                outcome = Outcome.failed(failure_of(exc), duration=self._clock() - started)
                log.debug("mirror to %s failed: %s", dest.name, exc)
            call.finish(step, outcome, self._clock())
        except RequestPathError as exc:  # pragma: no cover - defensive: a mirror never raises
            log.debug("mirror to %s refused: %s", dest.name, exc)
        finally:
            call.close()

    async def aclose(self) -> None:
        for task in list(self._mirrors):
            task.cancel()
        await self._inner.aclose()
