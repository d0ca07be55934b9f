"""What the async and sync transports share: translating httpx to the engines and back.

No decision is made here: these functions turn an ``httpx.Request`` into the
engine's ``RequestView``, an httpx exception or response into an ``Outcome``, and a
``LocalReply`` into an ``httpx.Response``.
"""

from __future__ import annotations

import email.utils
import functools
import time

import httpx

from .._exceptions import RequestPathError
from ..engine import Failure, HeaderOps, LocalReply, Outcome, RequestView

__all__ = [
    "DEFAULT_REPLAY_LIMIT",
    "FLAGS_EXTENSION",
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
