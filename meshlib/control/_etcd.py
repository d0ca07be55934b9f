"""A Store on etcd v3, over the JSON gateway every etcd member serves (no gRPC dependency).

Several control-plane replicas share one etcd cluster: its revisions, leases and
transactions give the Store protocol directly. The client fails over between members,
and never loses an acknowledged write nor reports a compare-and-put wrongly when a
member dies mid-request (see ``compare_and_put``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

import httpx

from ._store import Entry, Event, StoreError, encode_value

__all__ = ["EtcdStore"]

log = logging.getLogger("meshlib.control")

# Ask the member to refuse (503 "no leader") rather than hang for seconds when it has lost
# its leader, and to cancel watches then: grpc-gateway passes Grpc-Metadata-* as gRPC metadata.
_HEADERS = {"Grpc-Metadata-hasleader": "true"}
_LEASE_NOT_FOUND = "requested lease not found"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


def _range_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix`` (etcd's prefix range)."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def _int(value: Any) -> int:
    """etcd's int64 fields arrive as JSON strings, and are left out when 0."""
    return int(value or 0)


class _EtcdRefused(StoreError):
    """etcd answered with an error that retrying on another member would not change."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _endpoint_url(endpoint: str) -> str:
    endpoint = endpoint.strip().rstrip("/")
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    return endpoint


def _error_text(response: httpx.Response) -> tuple[str, int]:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200] or response.reason_phrase, 0
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or body), _int(body.get("code"))
    return str(body)[:200], 0


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class EtcdStore:
    """A Store over the etcd members at ``endpoints`` (``host:port`` or URLs), keys under ``prefix``.

    Each operation may take ``timeout`` seconds in all, trying the members in turn (one
    attempt at most ``attempt_timeout``), then raises StoreError naming every member and
    what went wrong with it. TTL keys use one lease per key; putting the same value again
    only renews its lease (found with a range, so a heartbeat reaching another replica
    renews it too). TTLs are whole seconds in etcd, rounded up. ``transport`` replaces
    httpx's (client certificates, or tests that cut connections).
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = "/meshlib/",
        timeout: float = 5.0,
        *,
        attempt_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        self.endpoints = [_endpoint_url(e) for e in endpoints if e.strip()]
        if not self.endpoints:
            raise StoreError("an etcd store needs at least one endpoint (host:port)")
        if not prefix.strip("/"):
            raise StoreError("an etcd store needs a key prefix (the default is /meshlib/)")
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.connect_timeout = connect_timeout
        self._transport = transport
        self._prefix = self.prefix.encode()
        # Write markers (see _write) live outside the prefix: no range or watch of the store sees them.
        self._markers = self.prefix.rstrip("/").encode() + b".writes/"
        self._marker_ttl = max(60, math.ceil(4 * timeout))
        self._marker_lease: tuple[int, float] | None = None
        self._marker_lock: asyncio.Lock | None = None
        self._granted: dict[int, int] = {}  # requested TTL -> what etcd granted (it has a minimum)
        self._current = 0  # the member tried first; moves on when it fails
        self._revision = 0
        self._client: httpx.AsyncClient | None = None
        self._streams: set[httpx.Response] = set()

    def __repr__(self) -> str:
        return f"EtcdStore({self.endpoints!r}, prefix={self.prefix!r})"

    @property
    def revision(self) -> int:
        return self._revision

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is not None:
            return
        self._client = httpx.AsyncClient(
            trust_env=False,  # never route the store through an HTTP proxy from the environment
            transport=self._transport,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
        )
        self._marker_lock = asyncio.Lock()
        self._marker_lease = None
        try:
            data = await self._call(
                "/v3/kv/range",
                {"key": _b64(self._prefix), "range_end": _b64(_range_end(self._prefix)), "count_only": True},
            )
        except BaseException:
            await self.close()
            raise
        self._revision = _int(data.get("header", {}).get("revision"))

    async def close(self) -> None:
        client, self._client = self._client, None
        for response in list(self._streams):
            with contextlib.suppress(Exception):
                await response.aclose()
        self._streams.clear()
        if client is not None:
            await client.aclose()

    # -- requests ------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise StoreError(f"{self!r} is not started")
        return self._client

    def _unavailable(self, failures: dict[str, str], what: str) -> StoreError:
        why = "; ".join(f"{e}: {reason}" for e, reason in failures.items()) or "no attempt"
        return StoreError(f"etcd is unavailable: {what} failed on every member within {self.timeout:g} s ({why})")

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to one member after another until one answers.

        A request whose fate is unknown (connection lost after sending, timeout, a member
        that lost its leader) is sent again to the next member: reads and lease grants are
        safe to repeat, and writes go through ``_write``, which makes repeating them safe.
        """
        client = self._http()
        deadline = time.monotonic() + self.timeout
        failures: dict[str, str] = {}
        tries = 0
        while True:
            index = self._current
            endpoint = self.endpoints[index]
            remaining = deadline - time.monotonic()
            attempt = max(0.05, min(remaining, self.attempt_timeout))
            try:
                response = await client.post(
                    endpoint + path,
                    json=body,
                    headers=_HEADERS,
                    timeout=httpx.Timeout(attempt, connect=min(attempt, self.connect_timeout)),
                )
            except httpx.TransportError as exc:
                failures[endpoint] = _describe(exc)
            else:
                if response.status_code == 200:
                    try:
                        data = response.json()
                    except ValueError:
                        data = None
                    if isinstance(data, dict):
                        return data
                    failures[endpoint] = f"unreadable answer {response.text[:100]!r}"
                else:
                    message, code = _error_text(response)
                    if response.status_code < 500 and response.status_code != 429:
                        raise _EtcdRefused(f"etcd refused {path} on {endpoint}: {message}", code)
                    failures[endpoint] = f"{response.status_code} {message}"
            log.debug("etcd %s on %s failed (%s); trying the next member", path, endpoint, failures[endpoint])
            if self._current == index:
                self._current = (index + 1) % len(self.endpoints)
            tries += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._unavailable(failures, path)
            if tries % len(self.endpoints) == 0:  # a whole round failed: an election, or a restart
                await asyncio.sleep(min(0.05 * 2 ** (tries // len(self.endpoints) - 1), 0.5, remaining))

    def _key(self, key: str) -> bytes:
        return self._prefix + key.encode()

    def _entry(self, kv: dict[str, Any]) -> Entry:
        full = _unb64(kv.get("key"))
        key = full[len(self._prefix) :].decode()
        try:
            value = json.loads(_unb64(kv.get("value")))
        except ValueError as exc:
            raise _EtcdRefused(f"etcd key {full.decode(errors='replace')!r} does not hold JSON: {exc}", 0) from exc
        if not isinstance(value, dict):
            raise _EtcdRefused(f"etcd key {full.decode(errors='replace')!r} does not hold a JSON object", 0)
        return Entry(key, value, _int(kv.get("mod_revision")))

    async def _grant(self, ttl: int) -> int:
        data = await self._call("/v3/lease/grant", {"TTL": str(ttl)})
        if data.get("error"):
            raise StoreError(f"etcd refused a lease of {ttl} s: {data['error']}")
        self._granted[ttl] = _int(data.get("TTL")) or ttl
        return _int(data.get("ID"))

    async def _keepalive(self, lease: int, ttl: int) -> bool:
        """Renew ``lease``; False when it is gone or has another TTL than a new grant of ``ttl`` would have.

        etcd raises TTLs below its minimum (1.5 election timeouts, 2 s by default); until
        this client has seen what it grants for ``ttl``, a lease up to 2 s longer passes.
        """
        data = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        result = data.get("result", data)
        granted = _int(result.get("TTL")) if isinstance(result, dict) else 0
        if granted <= 0:
            return False
        known = self._granted.get(ttl)
        return granted == known if known is not None else ttl <= granted <= ttl + 2

    async def _marker_lease_id(self) -> int:
        """The lease that cleans up write markers; renewed by a new grant well before it could run out."""
        self._http()
        assert self._marker_lock is not None
        async with self._marker_lock:
            now = time.monotonic()
            if self._marker_lease is None or now - self._marker_lease[1] > self._marker_ttl / 2:
                self._marker_lease = (await self._grant(self._marker_ttl), now)
            return self._marker_lease[0]

    async def _write(
        self, compare: list[dict[str, Any]], ops: Callable[[], Awaitable[list[dict[str, Any]]]]
    ) -> tuple[bool, int]:
        """Apply ``ops`` once if ``compare`` holds; return whether they applied and at which revision.

        Every write is a transaction that also creates a unique marker key, and applies only
        while that marker does not exist. When a member dies after the request left, the
        same transaction goes to another member: whichever attempt applies first creates
        the marker, so no other attempt can apply after it (a put is never doubled), and a
        failed comparison reads the marker to learn that an earlier attempt did apply (a
        compare-and-put is never reported lost when it won, nor won when another client
        wrote the same value). Markers live outside the prefix and expire with their lease.
        """
        marker = _b64(self._markers + uuid.uuid4().hex.encode())
        guard = {"target": "VERSION", "key": marker, "version": "0", "result": "EQUAL"}
        for _ in range(3):
            lease = await self._marker_lease_id()
            body = {
                "compare": [guard, *compare],
                "success": [*await ops(), {"request_put": {"key": marker, "value": "", "lease": str(lease)}}],
                "failure": [{"request_range": {"key": marker}}],
            }
            try:
                data = await self._call("/v3/kv/txn", body)
            except _EtcdRefused as exc:
                if _LEASE_NOT_FOUND not in str(exc):
                    raise
                self._marker_lease = None  # a lease ran out (a long pause): take new ones
                continue
            if data.get("succeeded"):
                return True, _int(data.get("header", {}).get("revision"))
            responses = data.get("responses") or [{}]
            kvs = responses[0].get("response_range", {}).get("kvs") or []
            return (True, _int(kvs[0].get("mod_revision"))) if kvs else (False, 0)
        raise StoreError("etcd kept losing the leases of a write")

    # -- the Store protocol --------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        data = await self._call("/v3/kv/range", {"key": _b64(self._key(key))})
        self._revision = _int(data.get("header", {}).get("revision"))
        kvs = data.get("kvs") or []
        return self._entry(kvs[0]) if kvs else None

    async def range(self, prefix: str) -> list[Entry]:
        start = self._key(prefix)
        data = await self._call("/v3/kv/range", {"key": _b64(start), "range_end": _b64(_range_end(start))})
        self._revision = _int(data.get("header", {}).get("revision"))
        return [self._entry(kv) for kv in data.get("kvs") or []]  # etcd sorts by key

    async def put(self, key: str, value: dict[str, Any], *, ttl: float | None = None) -> int:
        text = encode_value(key, value)
        full = _b64(self._key(key))
        put: dict[str, Any] = {"key": full, "value": _b64(text.encode())}
        if ttl is not None:
            if not ttl > 0:
                raise StoreError(f"ttl of {key!r} must be positive, not {ttl}")
            seconds = max(1, math.ceil(ttl))
            data = await self._call("/v3/kv/range", {"key": full})
            kvs = data.get("kvs") or []
            if kvs and _int(kvs[0].get("lease")):
                current = kvs[0]
                with contextlib.suppress(StoreError):
                    same = encode_value(key, self._entry(current).value) == text
                    if same and await self._keepalive(_int(current.get("lease")), seconds):
                        return _int(current.get("mod_revision"))  # a heartbeat: no write, no event

        async def ops() -> list[dict[str, Any]]:
            if ttl is not None:
                put["lease"] = str(await self._grant(seconds))  # one lease per key: renewing it renews only this key
            return [{"request_put": put}]

        _, revision = await self._write([], ops)
        return revision

    async def compare_and_put(self, key: str, value: dict[str, Any], expected_revision: int) -> bool:
        text = encode_value(key, value)
        if expected_revision < 0:
            raise StoreError(f"expected revision of {key!r} must be >= 0, not {expected_revision}")
        full = _b64(self._key(key))
        compare = {"target": "MOD", "key": full, "mod_revision": str(expected_revision), "result": "EQUAL"}

        async def ops() -> list[dict[str, Any]]:
            return [{"request_put": {"key": full, "value": _b64(text.encode())}}]

        applied, _ = await self._write([compare], ops)
        return applied

    async def delete(self, key: str) -> bool:
        full = _b64(self._key(key))
        exists = {"target": "VERSION", "key": full, "version": "0", "result": "GREATER"}

        async def ops() -> list[dict[str, Any]]:
            return [{"request_delete_range": {"key": full}}]

        applied, _ = await self._write([exists], ops)
        return applied

    async def watch(self, prefix: str, start_revision: int) -> AsyncGenerator[Event, None]:
        client = self._http()
        start = self._key(prefix)
        request: dict[str, Any] = {"key": _b64(start), "range_end": _b64(_range_end(start))}
        next_revision = max(0, start_revision)  # 0: from now, fixed by the first answer
        failures: dict[str, str] = {}
        failing_since: float | None = None
        tries = 0
        while True:
            index = self._current
            endpoint = self.endpoints[index]
            if next_revision:
                request["start_revision"] = str(next_revision)
            try:
                async with client.stream(
                    "POST",
                    endpoint + "/v3/watch",
                    json={"create_request": request},
                    headers=_HEADERS,
                    timeout=httpx.Timeout(None, connect=self.connect_timeout),
                ) as response:
                    self._streams.add(response)
                    try:
                        if response.status_code != 200:
                            await response.aread()
                            raise StoreError(f"{response.status_code} {_error_text(response)[0]}")
                        async for line in response.aiter_lines():
                            if not line.strip():
                                continue
                            message = json.loads(line)
                            if message.get("error"):
                                error = message["error"]
                                raise StoreError(str(error.get("message") if isinstance(error, dict) else error))
                            result = message.get("result") or {}
                            compacted = _int(result.get("compact_revision"))
                            if compacted:
                                raise _EtcdRefused(
                                    f"cannot watch {self.prefix}{prefix} from revision {next_revision}: etcd "
                                    f"compacted its history up to revision {compacted}; read the state again",
                                    11,
                                )
                            if result.get("canceled"):
                                raise StoreError(f"watch canceled: {result.get('cancel_reason') or 'no reason'}")
                            if result.get("created"):
                                failures.clear()
                                failing_since = None
                                if not next_revision:
                                    next_revision = _int(result.get("header", {}).get("revision")) + 1
                                continue
                            for raw in result.get("events") or []:
                                kv = raw.get("kv") or {}
                                revision = _int(kv.get("mod_revision"))
                                if raw.get("type") == "DELETE":
                                    key = _unb64(kv.get("key"))[len(self._prefix) :].decode()
                                    event = Event("delete", key, None, revision)
                                else:
                                    entry = self._entry(kv)
                                    event = Event("put", entry.key, entry.value, revision)
                                yield event
                                next_revision = max(next_revision, revision + 1)
                    finally:
                        self._streams.discard(response)
            except _EtcdRefused:
                raise
            except Exception as exc:  # a lost member shows as many kinds of errors: all mean "try the next one"
                if self._client is not client:
                    return  # the store was closed
                failures[endpoint] = _describe(exc) if not isinstance(exc, StoreError) else str(exc)
            else:
                if self._client is not client:
                    return
                failures[endpoint] = "the watch stream ended"
            log.debug(
                "etcd watch on %s lost (%s); resuming from revision %d", endpoint, failures[endpoint], next_revision
            )
            now = time.monotonic()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since > self.timeout:
                raise self._unavailable(failures, f"watching {self.prefix}{prefix}")
            if self._current == index:
                self._current = (index + 1) % len(self.endpoints)
            tries += 1
            if tries % len(self.endpoints) == 0:
                await asyncio.sleep(0.1)
