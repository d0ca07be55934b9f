"""Rate limit decisions from RateLimitPolicy, on the ``limits`` library.

Counting is ``limits``' job (memory for a LOCAL backend, the policy's ``storage``
URI, such as Redis, for a GLOBAL one); this module decides which counters a
request touches and turns their state into an answer with a ``Retry-After``.
``limits`` reads the wall clock itself; that is the one clock an engine does not
take as ``now``, and the reason tests of this module use real (short) windows.

When a GLOBAL storage fails (Redis down), the policy's ``failureMode`` decides:
OPEN lets the request through, CLOSED refuses it; either way a warning is logged
when the storage starts failing (and an info line when it is back), never silently.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from limits import RateLimitItem
from limits.errors import StorageError
from limits.storage import Storage, storage_from_string
from limits.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)

from ..policy import RateLimitPolicy, StringMatch

__all__ = ["RateDecision", "RateKeyInputs", "RateLimiterEngine"]

log = logging.getLogger("meshlib.ratelimit")

STORAGE_TIMEOUT = 0.25
"""Seconds a Redis storage may take to connect or answer before it counts as failed."""

_STRATEGIES: dict[str, type[RateLimiter]] = {
    "FIXED_WINDOW": FixedWindowRateLimiter,
    "MOVING_WINDOW": MovingWindowRateLimiter,
    "SLIDING_WINDOW_COUNTER": SlidingWindowCounterRateLimiter,
}


@dataclass(frozen=True, slots=True)
class RateKeyInputs:
    """What a limit's ``key`` may count by, for one request."""

    method: str
    path: str
    headers: Mapping[str, str]
    principal: str | None = None
    namespace: str | None = None
    remote_ip: str | None = None


@dataclass(frozen=True, slots=True)
class RateDecision:
    """Allowed, or refused with how long to wait and which limit said no."""

    allowed: bool
    retry_after: float = 0.0
    limit: str = ""
    policy: str = ""
    storage_failed: bool = False
    """Refused because the limit's storage failed and its ``failureMode`` is CLOSED."""
    amount: int = 0
    """Requests the refusing limit allows per window (``x-ratelimit-limit``)."""
    window: float = 0.0
    """Seconds in that window."""


_ALLOW = RateDecision(True)


@dataclass(frozen=True, slots=True)
class _Limit:
    name: str
    policy: str
    items: tuple[RateLimitItem, ...]
    key: str
    header: str | None
    paths: tuple[StringMatch, ...]
    methods: frozenset[str]
    storage: str = "memory://"
    fail_open: bool = True

    def applies(self, request: RateKeyInputs) -> bool:
        if self.methods and request.method not in self.methods:
            return False
        return not self.paths or any(m.matches(request.path) for m in self.paths)

    def key_value(self, request: RateKeyInputs) -> str | None:
        if self.key == "ALL":
            return ""
        if self.key == "PRINCIPAL":
            return request.principal
        if self.key == "NAMESPACE":
            return request.namespace
        if self.key == "PATH":
            return request.path
        if self.key == "REMOTE_IP":
            return request.remote_ip
        return request.headers.get(self.header or "")


class RateLimiterEngine:
    """Every limit of a set of RateLimitPolicies over one ``limits`` storage.

    A request that lacks the key a limit counts by (no principal on a plaintext
    call, no header) is counted under a shared ``<none>`` key rather than let
    through: a missing header must not be a way around a limit.
    """

    def __init__(self, policies: Sequence[RateLimitPolicy], storage: Storage | str = "memory://") -> None:
        """``storage`` counts the LOCAL policies; a GLOBAL policy counts in its backend's ``storage``."""
        self._storage = _sync_storage(storage_from_string(storage)) if isinstance(storage, str) else storage
        self._storages: dict[str, Storage] = {}
        self._limiters: dict[tuple[str, str], RateLimiter] = {}
        self._failing: set[str] = set()
        self.refused: dict[tuple[str, str], int] = {}
        """Requests refused, by (policy, limit name), for metrics; the engine carries over with its policies."""
        limits: list[tuple[_Limit, RateLimiter]] = []
        for policy in policies:
            spec = policy.spec
            backend = spec.backend
            uri = backend.storage if backend.type == "GLOBAL" and backend.storage else ""
            limiter = self._limiters.get((uri, spec.strategy))
            if limiter is None:
                limiter = _STRATEGIES[spec.strategy](self._storage_for(uri))
                self._limiters[(uri, spec.strategy)] = limiter
            for i, limit in enumerate(spec.limits):
                match = limit.match
                compiled = _Limit(
                    name=limit.name or f"limits[{i}]",
                    policy=policy.ref,
                    items=limit.parsed_rates,
                    key=limit.key,
                    header=limit.header,
                    paths=tuple(match.paths) if match else (),
                    methods=frozenset(match.methods) if match else frozenset(),
                    storage=uri or "memory://",
                    fail_open=backend.failure_mode == "OPEN",
                )
                limits.append((compiled, limiter))
        self._limits = tuple(limits)
        self._multi = sum(len(limit.items) for limit, _ in self._limits) > 1

    def _storage_for(self, uri: str) -> Storage:
        if not uri:
            return self._storage
        storage = self._storages.get(uri)
        if storage is None:
            options: dict[str, float | str | bool] = {"wrap_exceptions": True}
            if uri.startswith("redis"):
                options.update(socket_connect_timeout=STORAGE_TIMEOUT, socket_timeout=STORAGE_TIMEOUT)
            storage = self._storages[uri] = _sync_storage(storage_from_string(uri, **options))
        return storage

    def __bool__(self) -> bool:
        return bool(self._limits)

    @property
    def remote(self) -> bool:
        """Whether a limit counts in a remote storage (Redis): checks then do network IO."""
        return bool(self._storages)

    def check(self, request: RateKeyInputs) -> RateDecision:
        """Count the request against every limit it falls under; refuse if any is full.

        Every limit is tested before any is hit, so a refused request does not
        consume the budget of the limits that would have allowed it. A limit whose
        storage fails is skipped (``failureMode: OPEN``) or refuses (``CLOSED``).
        """
        chosen: list[tuple[_Limit, RateLimiter, str]] = []
        for limit, limiter in self._limits:
            if not limit.applies(request):
                continue
            value = limit.key_value(request)
            key = f"{limit.policy}/{limit.name}/{'<none>' if value is None else value}"
            try:
                # With a single counter, hit() alone decides; test first only when a
                # later limit could still refuse after this one was counted.
                for item in limit.items if self._multi else ():
                    if not limiter.test(item, key):
                        return self._refusal(limit, limiter, item, key)
            except (StorageError, ConnectionError, OSError) as exc:
                failed = self._storage_failed(limit, exc)
                if failed is not None:
                    return failed
                continue
            chosen.append((limit, limiter, key))
        for limit, limiter, key in chosen:
            try:
                for item in limit.items:
                    if not limiter.hit(item, key):  # full (or lost a race with another request)
                        self._storage_ok(limit)
                        return self._refusal(limit, limiter, item, key)
            except (StorageError, ConnectionError, OSError) as exc:
                failed = self._storage_failed(limit, exc)
                if failed is not None:
                    return failed
                continue
            self._storage_ok(limit)
        return _ALLOW

    def _storage_failed(self, limit: _Limit, exc: BaseException) -> RateDecision | None:
        """A limit's storage failed: ``None`` (let the request through) when it fails open, else the refusal."""
        if limit.storage not in self._failing:
            self._failing.add(limit.storage)
            log.warning(
                "rate limit storage %s of %s failed (%s): failureMode %s %s requests until it is back",
                _redact(limit.storage),
                limit.policy,
                getattr(exc, "storage_error", exc),
                "OPEN" if limit.fail_open else "CLOSED",
                "lets through" if limit.fail_open else "refuses",
            )
        if limit.fail_open:
            return None
        self._count(limit)
        return RateDecision(False, retry_after=1.0, limit=limit.name, policy=limit.policy, storage_failed=True)

    def _storage_ok(self, limit: _Limit) -> None:
        if self._failing and limit.storage in self._failing:
            self._failing.discard(limit.storage)
            log.info("rate limit storage %s of %s is back", _redact(limit.storage), limit.policy)

    def _count(self, limit: _Limit) -> None:
        ref = (limit.policy, limit.name)
        self.refused[ref] = self.refused.get(ref, 0) + 1

    def _refusal(self, limit: _Limit, limiter: RateLimiter, item: RateLimitItem, key: str) -> RateDecision:
        self._count(limit)
        stats = limiter.get_window_stats(item, key)
        wait = max(0.0, stats.reset_time - time.time())
        return RateDecision(
            False,
            retry_after=float(math.ceil(wait * 1000) / 1000),
            limit=limit.name,
            policy=limit.policy,
            amount=item.amount,
            window=float(item.get_expiry()),
        )


def _sync_storage(storage: object) -> Storage:
    if not isinstance(storage, Storage):  # an async+ URI, which the model refuses
        raise TypeError(f"{storage!r} is not a synchronous limits storage")
    return storage


def _redact(uri: str) -> str:
    """A storage URI without its password, for logs."""
    scheme, sep, rest = uri.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return uri
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}" if user else f"{scheme}{sep}***@{host}"
