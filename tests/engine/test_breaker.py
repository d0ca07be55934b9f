"""Circuit breaker: fail fast while a destination is down, probe it back carefully."""

from __future__ import annotations

import asyncio
import random

import pybreaker
import pytest

from meshlib.engine._breaker import Breaker
from meshlib.engine._outcome import Failure, Outcome

FAIL = Outcome.response(503)
OK = Outcome.response(200)


def breaker(**kw: object) -> Breaker:
    kw.setdefault("jitter", 0.0)
    kw.setdefault("rng", random.Random(1))
    return Breaker(**kw)  # type: ignore[arg-type]


def trip(b: Breaker, now: float, n: int = 7) -> None:
    for _ in range(n):
        assert b.allow(now)
        b.record(FAIL, now)


def test_opens_after_seven_consecutive_failures() -> None:
    b = breaker()
    trip(b, 0.0, 6)
    assert b.state == "closed"
    b.record(OK, 0.0)  # a success resets the count
    trip(b, 0.0, 6)
    assert b.state == "closed"
    b.record(Outcome.failed(Failure.RESET), 0.0)
    assert b.state == "open"
    assert not b.allow(0.1)
    assert b.stats().rejected == 1


def test_4xx_is_success_and_overflow_does_not_count() -> None:
    b = breaker(fail_max=2)
    for _ in range(5):
        b.record(Outcome.response(404), 0.0)
        b.record(Outcome.failed(Failure.OVERFLOW), 0.0)
    assert b.state == "closed"
    assert b.stats().consecutive_failures == 0


def test_rejects_until_reset_timeout_then_one_probe() -> None:
    b = breaker()
    trip(b, 10.0)
    assert not b.allow(10.5)
    assert not b.allow(10.999)
    assert b.allow(11.0)  # the probe
    assert b.state == "half-open"
    assert not b.allow(11.0)  # only one probe at a time
    assert not b.allow(11.5)
    b.record(OK, 11.2)
    assert b.state == "closed"
    assert all(b.allow(11.3) for _ in range(10))


def test_closes_after_success_threshold() -> None:
    b = breaker(success_threshold=3)
    trip(b, 0.0)
    for i in range(3):
        assert b.state == "half-open" or i == 0
        assert b.allow(1.0 + i)
        assert not b.allow(1.0 + i)
        b.record(OK, 1.0 + i)
    assert b.state == "closed"


def test_probe_failure_reopens_with_a_longer_penalty() -> None:
    b = breaker()
    trip(b, 0.0)
    t = 0.0
    for penalty in (1, 2, 4, 8, 16, 32, 60, 60):
        assert not b.allow(t + penalty - 0.01), penalty
        assert b.allow(t + penalty)
        t += penalty
        b.record(FAIL, t)
        assert b.state == "open"
        assert b.stats().reset_timeout == min(penalty * 2, 60)
    # a success closes and the penalty starts from 1 s again
    assert b.allow(t + 60)
    b.record(OK, t + 60)
    trip(b, t + 61)
    assert b.allow(t + 62)


def test_penalty_jitter() -> None:
    rng = random.Random(5)
    penalties = []
    for _ in range(200):
        b = Breaker(rng=rng)
        trip(b, 0.0)
        penalties.append(b.stats().reset_timeout)
    assert all(1.0 <= p < 1.5 for p in penalties)
    assert max(penalties) - min(penalties) > 0.3


def test_release_probe_lets_another_request_probe() -> None:
    b = breaker()
    trip(b, 0.0)
    assert b.allow(1.0)
    assert not b.allow(1.0)
    b.release_probe()
    assert b.allow(1.0)


def test_outcomes_arriving_while_open_change_nothing() -> None:
    b = breaker()
    trip(b, 0.0)
    b.record(OK, 0.5)  # a slow request that started before the trip
    assert b.state == "open"
    assert not b.allow(0.6)


def test_shared_storage_between_breakers() -> None:
    storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    a, other = breaker(state_storage=storage), breaker(state_storage=storage)
    trip(a, 0.0)
    assert other.state == "open"
    assert not other.allow(5.0)  # first sight starts its own penalty
    assert other.allow(6.0)


def test_invalid_settings() -> None:
    with pytest.raises(ValueError, match="fail_max"):
        Breaker(fail_max=0)
    with pytest.raises(ValueError, match="reset_timeout"):
        Breaker(reset_timeout=10.0, max_reset_timeout=5.0)


async def test_concurrent_tasks_never_block() -> None:
    b = Breaker(fail_max=50, rng=random.Random(2))
    cb_lock = b.breaker._lock
    in_flight = asyncio.Event()
    started = 0

    def locks_are_free() -> bool:
        # from another thread: pybreaker's RLock must not be held while requests are in flight
        if not cb_lock.acquire(timeout=1.0):
            return False
        cb_lock.release()
        return True

    async def request(i: int) -> bool:
        nonlocal started
        now = float(i) / 1000
        allowed = b.allow(now)
        started += 1
        if started == 100:
            in_flight.set()
        await in_flight.wait()  # every task is suspended mid-request here
        await asyncio.sleep(0)
        if allowed:
            b.record(FAIL if i % 3 else OK, now)
        return allowed

    tasks = [asyncio.create_task(request(i)) for i in range(100)]
    await asyncio.wait_for(in_flight.wait(), timeout=5)
    assert await asyncio.to_thread(locks_are_free)
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
    assert all(results)  # all were allowed while closed
    assert b.state == "closed"  # successes interleave: never 50 in a row
