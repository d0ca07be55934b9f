"""Rate limit decisions from RateLimitPolicy, on the ``limits`` library.

Counting is ``limits``' job (memory here, Redis for global limits); this module
decides which counters a request touches and turns their state into an answer
with a ``Retry-After``. ``limits`` reads the wall clock itself; that is the one
clock an engine does not take as ``now``, and the reason tests of this module use
real (short) windows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from limits import RateLimitItem
from limits.storage import Storage, storage_from_string
from limits.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)

from ..policy import RateLimitPolicy, StringMatch

__all__ = ["RateDecision", "RateKeyInputs", "RateLimiterEngine"]

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
        self._storage = storage_from_string(storage) if isinstance(storage, str) else storage
        self._limiters: dict[str, RateLimiter] = {}
        limits: list[tuple[_Limit, RateLimiter]] = []
        for policy in policies:
            spec = policy.spec
            limiter = self._limiters.get(spec.strategy)
            if limiter is None:
                limiter = self._limiters[spec.strategy] = _STRATEGIES[spec.strategy](self._storage)
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
                )
                limits.append((compiled, limiter))
        self._limits = tuple(limits)

    def __bool__(self) -> bool:
        return bool(self._limits)

    def check(self, request: RateKeyInputs) -> RateDecision:
        """Count the request against every limit it falls under; refuse if any is full.

        Every limit is tested before any is hit, so a refused request does not
        consume the budget of the limits that would have allowed it.
        """
        chosen: list[tuple[_Limit, RateLimiter, str]] = []
        for limit, limiter in self._limits:
            if not limit.applies(request):
                continue
            value = limit.key_value(request)
            key = f"{limit.policy}/{limit.name}/{'<none>' if value is None else value}"
            for item in limit.items:
                if not limiter.test(item, key):
                    return self._refusal(limit, limiter, item, key)
            chosen.append((limit, limiter, key))
        for limit, limiter, key in chosen:
            for item in limit.items:
                if not limiter.hit(item, key):  # lost a race with another request
                    return self._refusal(limit, limiter, item, key)
        return _ALLOW

    @staticmethod
    def _refusal(limit: _Limit, limiter: RateLimiter, item: RateLimitItem, key: str) -> RateDecision:
        stats = limiter.get_window_stats(item, key)
        wait = max(0.0, stats.reset_time - time.time())
        return RateDecision(
            False, retry_after=float(math.ceil(wait * 1000) / 1000), limit=limit.name, policy=limit.policy
        )
