"""Retry budget per destination: retries may add only a fraction to the load.

Per-request retry limits do not stop a retry storm: when a destination is down,
every caller multiplies its load by ``1 + attempts`` exactly when it can least take
it. A budget caps retries for the destination as a whole, two ways at once:

- **Tokens** (Finagle, Linkerd): every request deposits ``percent / 100`` of a
  retry, every retry withdraws one; deposits (and withdrawals) expire after
  ``ttl``; a reserve of ``min_retries_per_second * ttl`` retries lets a destination
  with little traffic still retry. Over any ``ttl`` window, retries are at most
  ``percent`` % of the requests plus the reserve.
- **Concurrency** (Envoy's ``retry_budget``, Istio's ``retryBudget``): retries in
  flight at most ``max(min_retry_concurrency, percent % of the requests in flight)``.

Time is sliced (10 slices per ``ttl``) so a request costs O(1) and memory does not
grow with the request rate; a deposit lives between ``ttl - ttl/10`` and ``ttl``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from ..policy._meshkinds import RetryBudgetDefaults
from ..policy._networking import RetryBudget as RetryBudgetSpec

__all__ = ["BudgetStats", "RetryBudget"]

_SCALE = 1000  # integer milli-retries: no float drift however many requests pass
_SLICES = 10


@dataclass(frozen=True, slots=True)
class BudgetStats:
    """A snapshot for metrics."""

    balance: float
    """Retries the token rule would allow right now (reserve included)."""
    requests: int
    retries: int
    rejected: int
    """Retries refused by either rule (Envoy's ``upstream_rq_retry_overflow``)."""
    active_requests: int
    retries_in_flight: int
    max_retries_in_flight: int | None
    """The concurrency rule's current limit; ``None`` when that rule is off."""


class RetryBudget:
    """One destination's retry budget, shared by all its concurrent requests.

    Use: ``record_request(now)`` when a request starts (not for its retries) and
    ``request_finished()`` when it ends; before each retry ``try_withdraw(now)``,
    which on ``True`` has taken a token *and* a concurrency slot, so the adapter
    calls ``retry_finished()`` when that retry attempt ends.
    """

    def __init__(
        self,
        percent: float = 20.0,
        *,
        min_retries_per_second: float = 10.0,
        ttl: float = 10.0,
        min_retry_concurrency: int | None = 3,
    ) -> None:
        if not 0.0 <= percent <= 100.0:
            raise ValueError(f"retry budget percent {percent} is not in 0..100")
        if ttl <= 0 or min_retries_per_second < 0:
            raise ValueError("retry budget ttl must be positive and min_retries_per_second not negative")
        self.percent = percent
        self.min_retries_per_second = min_retries_per_second
        self.ttl = ttl
        self.min_retry_concurrency = min_retry_concurrency
        self._deposit = round(percent * _SCALE / 100)
        self._reserve = math.floor(min_retries_per_second * ttl) * _SCALE
        self._width = ttl / _SLICES
        self._slots = [0] * _SLICES
        self._slice = 0  # absolute index of the newest slice
        self._sum = 0
        self._active = 0
        self._in_flight = 0
        self._requests = 0
        self._retries = 0
        self._rejected = 0
        self._lock = threading.Lock()

    @classmethod
    def from_policy(
        cls,
        mesh: RetryBudgetDefaults | None,
        destination: RetryBudgetSpec | None = None,
        *,
        min_retries_per_second: float = 10.0,
        ttl: float = 10.0,
    ) -> RetryBudget | None:
        """The DestinationRule's ``retryBudget`` if set, else the mesh's; ``None`` = no budget."""
        spec = destination if destination is not None else mesh
        if spec is None:
            return None
        return cls(
            spec.percent,
            min_retries_per_second=min_retries_per_second,
            ttl=ttl,
            min_retry_concurrency=spec.min_retry_concurrency,
        )

    # -------------------------------------------------------------- time slices

    def _advance(self, now: float) -> None:
        current = math.floor(now / self._width)
        gap = current - self._slice
        if gap <= 0:
            return
        slots = self._slots
        if gap >= _SLICES:
            slots[:] = [0] * _SLICES
            self._sum = 0
        else:
            for i in range(self._slice + 1, current + 1):
                j = i % _SLICES
                self._sum -= slots[j]
                slots[j] = 0
        self._slice = current

    def _add(self, amount: int) -> None:
        self._slots[self._slice % _SLICES] += amount
        self._sum += amount

    def _concurrency_limit(self) -> int | None:
        if self.min_retry_concurrency is None:
            return None
        return max(self.min_retry_concurrency, math.floor(self._active * self.percent / 100))

    # -------------------------------------------------------------- API

    def record_request(self, now: float) -> None:
        """A request (not a retry) starts: deposit ``percent / 100`` of a retry, count it in flight."""
        with self._lock:
            self._advance(now)
            self._add(self._deposit)
            self._active += 1
            self._requests += 1

    def request_finished(self) -> None:
        """The request (with all its retries) is over."""
        with self._lock:
            if self._active > 0:
                self._active -= 1

    def try_withdraw(self, now: float) -> bool:
        """May one retry go now? ``True`` takes a token and a concurrency slot (call ``retry_finished``)."""
        with self._lock:
            self._advance(now)
            limit = self._concurrency_limit()
            if (limit is not None and self._in_flight >= limit) or self._sum + self._reserve < _SCALE:
                self._rejected += 1
                return False
            self._add(-_SCALE)
            self._in_flight += 1
            self._retries += 1
            return True

    def retry_finished(self) -> None:
        """A retry admitted by ``try_withdraw`` has ended: free its concurrency slot."""
        with self._lock:
            if self._in_flight > 0:
                self._in_flight -= 1

    def stats(self, now: float) -> BudgetStats:
        """Counters and the balance at ``now``."""
        with self._lock:
            self._advance(now)
            return BudgetStats(
                balance=max(0, self._sum + self._reserve) / _SCALE,
                requests=self._requests,
                retries=self._retries,
                rejected=self._rejected,
                active_requests=self._active,
                retries_in_flight=self._in_flight,
                max_retries_in_flight=self._concurrency_limit(),
            )
