"""Connection-pool limits per destination (Istio ``connectionPool``, Envoy's circuit-breaker thresholds).

Envoy's thresholds, as Istio maps them:

================================  ==============================  =========================
Istio field                       Envoy threshold                 meshlib
================================  ==============================  =========================
``tcp.maxConnections``            ``max_connections``             HTTP/1: one request per
                                                                  connection, so it caps
                                                                  concurrent requests
``http.http2MaxRequests``         ``max_requests``                concurrent requests
``http.http1MaxPendingRequests``  ``max_pending_requests``        requests queued for a slot
``http.maxRetries``               ``max_retries``                 concurrent retries
================================  ==============================  =========================

A request beyond them is answered at once, never left to pile up: ``REJECT`` means
``CircuitOpenError`` with response flag UO (``x-envoy-overloaded``). For a *retry*,
Envoy skips the retry and returns the previous attempt's answer; adapters should
do the same. Unset limits are Istio's 2^32-1, which never rejects.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass

from ..policy._networking import UNLIMITED, ConnectionPoolSettings

__all__ = ["Admission", "PoolLimits", "PoolStats"]


class Admission(enum.Enum):
    """What ``try_acquire`` decided."""

    ADMIT = "admit"
    """Send now; call ``release`` when the attempt ends."""
    QUEUE = "queue"
    """Wait (bounded by the deadline) for a ``release``, then ``promote``; on giving up, ``dequeue``."""
    REJECT = "reject"
    """Overflow (UO): answer ``CircuitOpenError`` at once (for a retry: return the previous answer)."""


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot for metrics (Envoy's ``upstream_rq_active``, ``_pending_active``, ``_overflow``...)."""

    active: int
    pending: int
    active_retries: int
    max_requests: int
    max_pending: int
    max_retries: int
    overflows: int
    retry_overflows: int


class PoolLimits:
    """One destination's request slots, shared by its concurrent requests.

    ``try_acquire`` → ``ADMIT`` (then ``release``), ``QUEUE`` (wait for a release,
    then ``promote``; ``dequeue`` if the deadline passes first) or ``REJECT``. Pass
    the same ``is_retry`` to every call for one attempt: a retry holds a retry slot
    from ``try_acquire`` until ``release`` or ``dequeue``.
    """

    def __init__(
        self,
        *,
        max_requests: int = UNLIMITED,
        max_pending: int = UNLIMITED,
        max_retries: int = UNLIMITED,
        max_requests_per_connection: int = 0,
        connect_timeout: float = 10.0,
    ) -> None:
        if min(max_requests, max_pending, max_retries, max_requests_per_connection) < 0:
            raise ValueError("connection-pool limits cannot be negative")
        self.max_requests = max_requests
        self.max_pending = max_pending
        self.max_retries = max_retries
        self.max_requests_per_connection = max_requests_per_connection
        """Keep-alive hint for the adapter: 0 = unlimited, 1 = no keep-alive (Istio)."""
        self.connect_timeout = connect_timeout
        self._active = 0
        self._pending = 0
        self._retries = 0
        self._overflows = 0
        self._retry_overflows = 0
        self._lock = threading.Lock()

    @classmethod
    def from_policy(cls, settings: ConnectionPoolSettings | None, *, http2: bool = False) -> PoolLimits:
        """Limits from a DestinationRule's ``connectionPool`` (``None`` = Istio's defaults, unlimited).

        Over HTTP/1 a connection carries one request at a time, so concurrent
        requests are capped by ``min(maxConnections, http2MaxRequests)``; over HTTP/2
        by ``http2MaxRequests`` alone.
        """
        s = settings if settings is not None else ConnectionPoolSettings()
        max_requests = s.http.http2_max_requests
        if not http2:
            max_requests = min(max_requests, s.tcp.max_connections)
        return cls(
            max_requests=max_requests,
            max_pending=s.http.http1_max_pending_requests,
            max_retries=s.http.max_retries,
            max_requests_per_connection=s.http.max_requests_per_connection,
            connect_timeout=s.tcp.connect_timeout,
        )

    @property
    def keep_alive(self) -> bool:
        """Whether connections may be reused (``maxRequestsPerConnection`` is not 1)."""
        return self.max_requests_per_connection != 1

    def try_acquire(self, *, is_retry: bool = False) -> Admission:
        """Take a request slot, or a place in the queue, or neither."""
        with self._lock:
            if is_retry and self._retries >= self.max_retries:
                self._retry_overflows += 1
                return Admission.REJECT
            # Slots freed while attempts wait are theirs: a newcomer may not jump the queue.
            if self._active + self._pending < self.max_requests:
                self._active += 1
                if is_retry:
                    self._retries += 1
                return Admission.ADMIT
            if self._pending < self.max_pending:
                self._pending += 1
                if is_retry:
                    self._retries += 1
                return Admission.QUEUE
            self._overflows += 1
            return Admission.REJECT

    def promote(self) -> bool:
        """A queued attempt takes a freed slot: ``True`` = send now (then ``release``), ``False`` = keep waiting."""
        with self._lock:
            if self._pending == 0 or self._active >= self.max_requests:
                return False
            self._pending -= 1
            self._active += 1
            return True

    def dequeue(self, *, is_retry: bool = False) -> None:
        """A queued attempt gives up (deadline, cancellation) without being sent."""
        with self._lock:
            if self._pending > 0:
                self._pending -= 1
            if is_retry and self._retries > 0:
                self._retries -= 1

    def release(self, *, is_retry: bool = False) -> bool:
        """An admitted attempt ended. ``True`` if attempts are queued: wake one to ``promote``."""
        with self._lock:
            if self._active > 0:
                self._active -= 1
            if is_retry and self._retries > 0:
                self._retries -= 1
            return self._pending > 0

    @property
    def pending(self) -> int:
        """Attempts waiting in the queue."""
        return self._pending

    def stats(self) -> PoolStats:
        """Counters for metrics."""
        with self._lock:
            return PoolStats(
                active=self._active,
                pending=self._pending,
                active_retries=self._retries,
                max_requests=self.max_requests,
                max_pending=self.max_pending,
                max_retries=self.max_retries,
                overflows=self._overflows,
                retry_overflows=self._retry_overflows,
            )
