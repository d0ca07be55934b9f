"""A fast HTTP/1.1 inner transport for httpx, on asyncio protocols and httptools.

Why this exists: the mesh client is an httpx transport that wraps an *inner*
transport doing the actual HTTP. httpx's own ``AsyncHTTPTransport`` (httpcore on
asyncio streams, h11 in pure Python) spends ~520 µs of httpx's ~730 µs per
request on our 2-core machines, far more than a loopback round trip (~125 µs).
``FastAsyncTransport`` does the same job on an ``asyncio.Protocol`` (no streams)
with the C parser ``httptools`` (llhttp), so that httpx + meshlib's policy costs
less than bare httpx. It speaks HTTP/1.1 only; the sidecar and the mesh speak it
between workloads.

What it does: a keep-alive pool per origin with a connection limit, waiters and
a pool timeout; idle expiry; detection of connections the server closed while
idle; one retry on a fresh connection when a *reused* connection dies before a
single response byte arrives and the method is idempotent (the keep-alive race:
the server may have read the request, so a POST is never sent twice); request
bodies of known length or chunked; response bodies streamed with read flow
control; httpx's own exceptions for timeouts and protocol errors; TLS with a
context that can be swapped for new connections (certificate rotation).

A request that fails because the server closed without sending any byte raises
``httpx.RemoteProtocolError`` whose message starts with
``"Server disconnected without sending a response"``, exactly like httpcore, so
the mesh's retry logic recognises it whichever inner transport is used.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator
from typing import Any, NamedTuple, TypeVar, cast

import httptools
import httpx

__all__ = ["FastAsyncTransport"]

_Origin = tuple[bytes, str, int]
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_T = TypeVar("_T")

_NO_RESPONSE = "Server disconnected without sending a response."
_HIGH_WATER = 256 * 1024  # pause reading the socket above this many unconsumed body bytes (resume once taken)
_JOIN_LIMIT = 64 * 1024  # send head and body in one write below this body size
_NO_BODY_STATUS = frozenset({204, 304})


class _Outgoing(NamedTuple):
    """A serialised request: the head, then the body in memory or a stream (chunk-encoded or not)."""

    head: bytes
    body: bytes
    stream: httpx.AsyncByteStream | None
    chunked: bool
    close: bool  # the request said Connection: close


def _fire(waiter: asyncio.Future[_T], value: _T) -> None:
    if not waiter.done():
        waiter.set_result(value)


def _keep_alive(version: str, headers: list[tuple[bytes, bytes]]) -> bool:
    """Keep-alive from the headers alone (for HEAD, where llhttp cannot know there is no body)."""
    keep = version == "1.1"
    for name, value in headers:
        if name.lower() == b"connection":
            tokens = {token.strip() for token in value.lower().split(b",")}
            if b"close" in tokens:
                return False
            if b"keep-alive" in tokens:
                keep = True
    return keep


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: the socket's protocol, the parser's callbacks, one exchange at a time."""

    __slots__ = (
        "_drain_waiter",
        "_informational",
        "_loop",
        "_parser",
        "_parser_dirty",
        "_waiter",
        "_write_paused",
        "buffered",
        "chunks",
        "close_requested",
        "complete",
        "discarded",
        "error",
        "exchanges",
        "exchanging",
        "head_request",
        "headers",
        "headers_done",
        "http_version",
        "idle",
        "idle_since",
        "keep_alive",
        "lost",
        "no_response",
        "pool",
        "reading_paused",
        "reason",
        "received",
        "request",
        "stale",
        "status",
        "transport",
    )

    def __init__(self, pool: _OriginPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._parser_dirty = False
        self._waiter: asyncio.Future[bool] | None = None
        self._drain_waiter: asyncio.Future[bool] | None = None
        self._write_paused = False
        self.idle = False
        self.idle_since = 0.0
        self.lost = False  # the peer closed (EOF) or the socket is gone
        self.stale = False  # something arrived while no exchange was running
        self.discarded = False
        self.exchanges = 0
        self.exchanging = False
        self.reading_paused = False
        self.chunks: collections.deque[bytes] = collections.deque()
        self._reset(None, head_request=False)

    def _reset(self, request: httpx.Request | None, *, head_request: bool) -> None:
        self.request = request
        self.head_request = head_request
        self.close_requested = False
        self.status = 0
        self.reason = b""
        self.http_version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.received = False
        self.no_response = False
        self.error: httpx.HTTPError | None = None
        self.chunks.clear()
        self.buffered = 0
        self._informational = False

    def begin(self, request: httpx.Request, *, head_request: bool) -> None:
        """Start an exchange on this (fresh or reused) connection."""
        if self._parser_dirty:
            self._parser = httptools.HttpResponseParser(self)
            self._parser_dirty = False
        self._reset(request, head_request=head_request)
        self.idle = False
        self.exchanging = True
        self.exchanges += 1

    @property
    def reusable(self) -> bool:
        transport = self.transport
        return (
            self.complete
            and self.keep_alive
            and not self.close_requested
            and self.error is None
            and not self.lost
            and not self.stale
            and transport is not None
            and not transport.is_closing()
        )

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._wake()

    # -- waiting ------------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(True)

    async def wait(self, timeout: float | None) -> bool:
        """Wait until something happens to the exchange; False if ``timeout`` elapsed first."""
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._waiter = waiter
        if timeout is None:
            return await waiter
        handle = self._loop.call_later(timeout, _fire, waiter, False)
        try:
            return await waiter
        finally:
            handle.cancel()

    def write(self, data: bytes) -> None:
        if not self.lost and self.transport is not None and not self.transport.is_closing():
            try:
                self.transport.write(data)
            except (OSError, RuntimeError):  # uvloop raises on a handle closed under us
                self.lost = True

    async def drain(self, timeout: float | None) -> bool:
        """Wait until the socket's write buffer drained (or the connection died); False on timeout."""
        if not self._write_paused or self.lost:
            return True
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._drain_waiter = waiter
        handle = None if timeout is None else self._loop.call_later(timeout, _fire, waiter, False)
        try:
            return await waiter
        finally:
            self._drain_waiter = None
            if handle is not None:
                handle.cancel()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        if self.discarded:  # the transport was closed while this connection was being opened
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if not self.exchanging or self.complete:
            # Nothing is expected: a 408 before closing an idle connection, or garbage.
            self.stale = True
            if self.idle:
                self.pool.discard(self)
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("HTTP upgrade is not supported", request=self.request))
        except httptools.HttpParserError as exc:
            if self.complete:  # bytes after the whole response: keep the response, not the connection
                self.stale = True
                self.close()
            else:
                self._fail(httpx.RemoteProtocolError(f"malformed HTTP response: {exc}", request=self.request))

    def eof_received(self) -> bool | None:
        self._on_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_eof()
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            _fire(waiter, True)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            _fire(waiter, True)

    def _on_eof(self) -> None:
        self.lost = True
        if not self.exchanging:
            self.stale = True
            if self.idle:
                self.pool.discard(self)
            return
        if self.complete or self.error is not None:
            return
        if self.headers_done and not any(
            name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self.headers
        ):
            self.complete = True  # a body delimited by the end of the connection
            self.keep_alive = False
            self._wake()
            return
        if not self.received:
            self.no_response = True
            message = _NO_RESPONSE
        elif not self.headers_done:
            message = "Server disconnected while sending the response headers."
        else:
            message = "Server disconnected without sending the complete response body."
        self._fail(httpx.RemoteProtocolError(message, request=self.request))

    def _fail(self, error: httpx.HTTPError) -> None:
        if self.error is None:
            self.error = error
        self.close()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second response to one request: stop the parser before it clobbers the first
            raise RuntimeError("unsolicited response")
        self.headers = []
        self.reason = b""

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._informational = True  # 100 Continue and friends: wait for the real response
            return
        self.status = status
        self.http_version = self._parser.get_http_version()
        self.headers_done = True
        if self.head_request:
            # llhttp cannot know a HEAD response has no body: end it here, use a new parser next time.
            self.complete = True
            self.keep_alive = _keep_alive(self.http_version, self.headers)
            self._parser_dirty = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:  # a body after a HEAD response: do not trust this connection again
            self.stale = True
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if not self.complete:
            self.complete = True
            self.keep_alive = self._parser.should_keep_alive()
            self._wake()

    def take_body(self) -> bytes:
        """Everything buffered so far, resuming reads if they were paused."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.reading_paused:
            self.reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        return data


class _OriginPool:
    """Connections to one origin: idle ones (LIFO), a count of all, and waiters for a free slot."""

    __slots__ = ("conns", "idle", "origin", "owner", "waiters")

    def __init__(self, owner: FastAsyncTransport, origin: _Origin) -> None:
        self.owner = owner
        self.origin = origin
        self.idle: list[_Connection] = []
        self.conns: set[_Connection] = set()
        # A waiter gets a connection handed over, True for "a slot is free", False for a timeout.
        self.waiters: collections.deque[asyncio.Future[_Connection | bool]] = collections.deque()

    @staticmethod
    def _alive(conn: _Connection) -> bool:
        transport = conn.transport
        return not (conn.lost or conn.stale or transport is None or transport.is_closing())

    def _usable(self, conn: _Connection, now: float) -> bool:
        expiry = self.owner._keepalive_expiry
        return self._alive(conn) and (expiry is None or now - conn.idle_since <= expiry)

    async def acquire(self, request: httpx.Request, timeouts: dict[str, Any], *, fresh: bool) -> _Connection:
        loop = asyncio.get_running_loop()
        pool_timeout: float | None = timeouts.get("pool")
        deadline = None if pool_timeout is None else loop.time() + pool_timeout
        while True:
            if not fresh:
                idle = self.idle
                now = loop.time()
                while idle:
                    conn = idle.pop()
                    conn.idle = False
                    if self._usable(conn, now):
                        return conn
                    self.discard(conn)
            if len(self.conns) < self.owner._max_connections:
                return await self.owner._connect(self, request, timeouts)
            waiter: asyncio.Future[_Connection | bool] = loop.create_future()
            self.waiters.append(waiter)
            handle = None
            if deadline is not None:
                handle = loop.call_later(max(deadline - loop.time(), 0.0), _fire, waiter, False)
            try:
                result = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._pass_on(waiter.result())  # cancelled after being handed something
                raise
            finally:
                if handle is not None:
                    handle.cancel()
                if not waiter.done():
                    self.waiters.remove(waiter)
            if isinstance(result, _Connection):
                if self._alive(result):
                    return result
                self.discard(result)
            elif result is False:
                raise httpx.PoolTimeout("Timed out waiting for a free connection in the pool", request=request)

    def _pass_on(self, value: _Connection | bool) -> None:
        if isinstance(value, _Connection):
            self.release(value)
        elif value is True:
            self._wake_one(True)

    def _wake_one(self, value: _Connection | bool) -> bool:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(value)
                return True
        return False

    def release(self, conn: _Connection) -> None:
        """The exchange on ``conn`` is over: keep the connection for reuse, or close it."""
        conn.exchanging = False
        conn.request = None
        if conn.discarded:
            return
        if not conn.reusable:
            self.discard(conn)
            return
        if conn.chunks or conn.reading_paused:
            conn.take_body()
        if self.waiters and self._wake_one(conn):
            return
        idle = self.idle
        loop_time = conn._loop.time()
        expiry = self.owner._keepalive_expiry
        while idle and expiry is not None and loop_time - idle[0].idle_since > expiry:
            self.discard(idle[0])
        if len(idle) >= self.owner._max_idle:
            self.discard(conn)
            return
        conn.idle = True
        conn.idle_since = loop_time
        idle.append(conn)

    def discard(self, conn: _Connection) -> None:
        """Close ``conn`` for good and free its slot (idempotent)."""
        if conn.discarded:
            return
        conn.discarded = True
        if conn.idle:
            conn.idle = False
            self.idle.remove(conn)
        conn.close()
        self.conns.discard(conn)
        if self.waiters:
            self._wake_one(True)


class _ResponseStream(httpx.AsyncByteStream):
    """The body of a response still arriving: chunks as they come, the connection released at the end."""

    __slots__ = ("_conn", "_timeout")

    def __init__(self, conn: _Connection, timeout: float | None) -> None:
        self._conn: _Connection | None = conn
        self._timeout = timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        request = conn.request
        try:
            while True:
                if conn.chunks:
                    yield conn.take_body()
                    if self._conn is not conn:
                        return
                elif conn.complete:
                    self._conn = None
                    conn.pool.release(conn)
                    return
                elif conn.error is not None:
                    raise conn.error
                elif not await conn.wait(self._timeout):
                    raise httpx.ReadTimeout("Timed out reading the response body", request=request)
        except BaseException:
            if self._conn is conn:
                self._conn = None
                conn.pool.discard(conn)
            raise

    async def aclose(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            if conn.complete:  # fully received, maybe not consumed: the connection is clean
                conn.pool.release(conn)
            else:
                conn.pool.discard(conn)


class FastAsyncTransport(httpx.AsyncBaseTransport):
    """An HTTP/1.1 httpx transport with a keep-alive pool per origin, on uvloop or asyncio.

    ``ssl_context`` serves ``https`` origins (httpx's default verification if None);
    ``set_ssl_context`` swaps it for new connections only. Timeouts come from the
    request's ``timeout`` extension as httpx sets it.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections_per_origin: int = 100,
        max_idle_per_origin: int = 100,
        keepalive_expiry: float | None = 5.0,
    ) -> None:
        if max_connections_per_origin < 1:
            raise ValueError("max_connections_per_origin must be at least 1")
        self._ssl_context = ssl_context
        self._max_connections = max_connections_per_origin
        self._max_idle = max(max_idle_per_origin, 0)
        self._keepalive_expiry = keepalive_expiry
        self._pools: dict[_Origin, _OriginPool] = {}

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return self._ssl_context

    def set_ssl_context(self, ssl_context: ssl.SSLContext | None) -> None:
        """Use ``ssl_context`` for connections opened from now on; open ones keep theirs."""
        self._ssl_context = ssl_context

    async def aclose(self) -> None:
        for pool in list(self._pools.values()):
            for conn in list(pool.conns):
                pool.discard(conn)
        self._pools.clear()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.raw_scheme
        if scheme == b"http":
            default_port = 80
        elif scheme == b"https":
            default_port = 443
        else:
            raise httpx.UnsupportedProtocol(f"Unsupported URL scheme {url.scheme!r}", request=request)
        origin = (scheme, url.raw_host.decode("ascii"), url.port or default_port)
        timeouts: dict[str, Any] = request.extensions.get("timeout") or {}
        outgoing = self._serialise(request)
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _OriginPool(self, origin)

        conn = await pool.acquire(request, timeouts, fresh=False)
        reused = conn.exchanges > 0
        try:
            return await self._exchange(conn, request, outgoing, timeouts)
        except httpx.RemoteProtocolError:
            # A reused connection the server closed just as we sent (the keep-alive race).
            # The server may still have read it, so only an idempotent request is sent
            # again here; meshlib's retry policy decides the rest, knowing the method.
            if not (reused and conn.no_response and outgoing.stream is None and request.method in _IDEMPOTENT):
                raise
        conn = await pool.acquire(request, timeouts, fresh=True)
        return await self._exchange(conn, request, outgoing, timeouts)

    @staticmethod
    def _serialise(request: httpx.Request) -> _Outgoing:
        url = request.url
        lines = [b"%b %b HTTP/1.1" % (request.method.encode("ascii"), url.raw_path)]
        has_host = has_length = chunked = close_requested = False
        for name, value in request.headers.raw:
            lower = name.lower()
            if lower == b"host":
                has_host = True
            elif lower == b"content-length":
                has_length = True
            elif lower == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lower == b"connection":
                close_requested = b"close" in value.lower()
            lines.append(name + b": " + value)
        if not has_host:
            lines.insert(1, b"Host: " + url.netloc)
        request_stream = request.stream
        body = b""
        stream: httpx.AsyncByteStream | None = None
        if isinstance(request_stream, httpx.ByteStream):
            body = b"".join(request_stream)
            if chunked:
                body = (b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)) if body else b"0\r\n\r\n"
            elif body and not has_length:
                lines.append(b"Content-Length: %d" % len(body))
        elif isinstance(request_stream, httpx.AsyncByteStream):
            stream = request_stream
            if not has_length and not chunked:
                lines.append(b"Transfer-Encoding: chunked")
                chunked = True
        else:
            raise TypeError("FastAsyncTransport needs an async request body (use httpx.AsyncClient)")
        lines.append(b"\r\n")
        return _Outgoing(b"\r\n".join(lines), body, stream, chunked, close_requested)

    async def _exchange(
        self,
        conn: _Connection,
        request: httpx.Request,
        outgoing: _Outgoing,
        timeouts: dict[str, Any],
    ) -> httpx.Response:
        pool = conn.pool
        conn.begin(request, head_request=request.method == "HEAD")
        conn.close_requested = outgoing.close
        try:
            write_timeout: float | None = timeouts.get("write")
            if outgoing.stream is not None:
                conn.write(outgoing.head)
                await self._send_stream(conn, outgoing.stream, outgoing.chunked, write_timeout, request)
            elif len(outgoing.body) < _JOIN_LIMIT:
                conn.write(outgoing.head + outgoing.body)
            else:
                conn.write(outgoing.head)
                conn.write(outgoing.body)
            if not await conn.drain(write_timeout):
                raise httpx.WriteTimeout("Timed out sending the request", request=request)
            read_timeout: float | None = timeouts.get("read")
            while not conn.headers_done:
                if conn.error is not None:
                    raise conn.error
                if not await conn.wait(read_timeout):
                    raise httpx.ReadTimeout("Timed out waiting for the response", request=request)
        except BaseException:
            pool.discard(conn)
            raise
        response_stream: httpx.AsyncByteStream
        if conn.complete or conn.status in _NO_BODY_STATUS:
            # The whole response is here (the common case for small bodies): free the connection now.
            response_stream = httpx.ByteStream(conn.take_body() if conn.chunks else b"")
            pool.release(conn)
        else:
            response_stream = _ResponseStream(conn, read_timeout)
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=response_stream,
            extensions={
                "http_version": b"HTTP/1.1" if conn.http_version == "1.1" else b"HTTP/" + conn.http_version.encode(),
                "reason_phrase": conn.reason,
            },
        )

    @staticmethod
    async def _send_stream(
        conn: _Connection, stream: httpx.AsyncByteStream, chunked: bool, timeout: float | None, request: httpx.Request
    ) -> None:
        async for chunk in stream:
            if conn.lost:
                return  # the server hung up: its answer (or the error) is what matters now
            if not chunk:
                continue
            if not chunked:
                conn.write(chunk)
            elif len(chunk) < _JOIN_LIMIT:
                conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                conn.write(b"%x\r\n" % len(chunk))
                conn.write(chunk)
                conn.write(b"\r\n")
            if not await conn.drain(timeout):
                raise httpx.WriteTimeout("Timed out sending the request body", request=request)
        if chunked:
            conn.write(b"0\r\n\r\n")

    async def _connect(self, pool: _OriginPool, request: httpx.Request, timeouts: dict[str, Any]) -> _Connection:
        scheme, host, port = pool.origin
        loop = asyncio.get_running_loop()
        conn = _Connection(pool, loop)
        pool.conns.add(conn)  # holds the slot while connecting
        context: ssl.SSLContext | None = None
        server_hostname: str | None = None
        if scheme == b"https":
            if self._ssl_context is None:
                self._ssl_context = httpx.create_ssl_context()
            context = self._ssl_context
            sni = request.extensions.get("sni_hostname")
            server_hostname = sni.decode("ascii") if isinstance(sni, bytes) else (sni or host)
        try:
            async with asyncio.timeout(timeouts.get("connect")):
                await loop.create_connection(lambda: conn, host, port, ssl=context, server_hostname=server_hostname)
        except TimeoutError:
            pool.discard(conn)
            raise httpx.ConnectTimeout(f"Timed out connecting to {host}:{port}", request=request) from None
        except OSError as exc:  # refused, unreachable, DNS, TLS handshake (ssl.SSLError)
            pool.discard(conn)
            raise httpx.ConnectError(f"Cannot connect to {host}:{port}: {exc}", request=request) from exc
        except BaseException:
            pool.discard(conn)
            raise
        return conn
