"""Connection-pool limits: admit, queue, or answer overflow at once."""

from __future__ import annotations

from typing import Any

import pytest

from meshlib.engine._pool import Admission, PoolLimits
from meshlib.policy._networking import UNLIMITED, ConnectionPoolSettings

ADMIT, QUEUE, REJECT = Admission.ADMIT, Admission.QUEUE, Admission.REJECT


def pool(spec: dict[str, Any] | None = None, *, http2: bool = False) -> PoolLimits:
    settings = ConnectionPoolSettings.model_validate(spec) if spec is not None else None
    return PoolLimits.from_policy(settings, http2=http2)


def test_admit_then_queue_then_reject() -> None:
    p = pool({"tcp": {"maxConnections": 2}, "http": {"http1MaxPendingRequests": 1}})
    assert [p.try_acquire() for _ in range(4)] == [ADMIT, ADMIT, QUEUE, REJECT]
    s = p.stats()
    assert (s.active, s.pending, s.overflows) == (2, 1, 1)


def test_release_wakes_the_queue_and_the_queue_goes_first() -> None:
    p = pool({"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 5}})
    assert p.try_acquire() is ADMIT
    assert p.try_acquire() is QUEUE
    assert not p.promote()  # still full
    assert p.release()  # someone is waiting
    assert p.try_acquire() is QUEUE  # a newcomer does not take the waiter's slot
    assert p.promote()
    assert p.stats().active == 1
    p.dequeue()  # the second waiter's deadline passed
    assert not p.release()
    assert (p.stats().active, p.stats().pending) == (0, 0)


def test_http2_max_requests_is_the_cap_for_http1_too() -> None:
    p = pool({"tcp": {"maxConnections": 100}, "http": {"http2MaxRequests": 3, "http1MaxPendingRequests": 1}})
    assert p.max_requests == 3
    assert [p.try_acquire() for _ in range(5)] == [ADMIT, ADMIT, ADMIT, QUEUE, REJECT]


def test_http2_ignores_max_connections_for_requests() -> None:
    p = pool({"tcp": {"maxConnections": 1}, "http": {"http2MaxRequests": 50}}, http2=True)
    assert p.max_requests == 50


def test_retries_limit() -> None:
    p = pool({"http": {"maxRetries": 2}})
    assert p.try_acquire(is_retry=True) is ADMIT
    assert p.try_acquire(is_retry=True) is ADMIT
    assert p.try_acquire(is_retry=True) is REJECT
    assert p.try_acquire() is ADMIT  # first tries are not retries
    p.release(is_retry=True)
    assert p.try_acquire(is_retry=True) is ADMIT
    s = p.stats()
    assert (s.active_retries, s.retry_overflows, s.overflows) == (2, 1, 0)


def test_queued_retry_holds_its_retry_slot_until_dequeued() -> None:
    p = pool({"tcp": {"maxConnections": 1}, "http": {"maxRetries": 1}})
    assert p.try_acquire() is ADMIT
    assert p.try_acquire(is_retry=True) is QUEUE
    assert p.try_acquire(is_retry=True) is REJECT
    p.dequeue(is_retry=True)
    assert p.stats().active_retries == 0


def test_istio_defaults_are_unlimited() -> None:
    p = pool(None)
    assert (p.max_requests, p.max_pending, p.max_retries) == (UNLIMITED, UNLIMITED, UNLIMITED)
    assert all(p.try_acquire() is ADMIT for _ in range(10_000))
    assert p.connect_timeout == 10.0
    assert p.keep_alive


def test_keep_alive_hint() -> None:
    p = pool({"http": {"maxRequestsPerConnection": 1}, "tcp": {"connectTimeout": "250ms"}})
    assert p.max_requests_per_connection == 1
    assert not p.keep_alive
    assert p.connect_timeout == 0.25


def test_negative_limits_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        PoolLimits(max_requests=-1)
