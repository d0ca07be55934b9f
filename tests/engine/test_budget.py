"""Retry budget: an outage must not turn into a retry storm, and quiet services can still retry."""

from __future__ import annotations

import random
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from meshlib.engine._budget import RetryBudget
from meshlib.engine._outcome import Outcome
from meshlib.engine._retry import RetryPolicy
from meshlib.policy._meshkinds import RetryBudgetDefaults
from meshlib.policy._networking import HTTPRetry
from meshlib.policy._networking import RetryBudget as RetryBudgetSpec

FAILING = Outcome.response(503)
THREE_RETRIES = RetryPolicy.compile(HTTPRetry(attempts=3, retry_on="5xx"))


def storm(budget: RetryBudget, requests: int, rate: float, start: float = 0.0) -> int:
    """Every request fails; the policy allows 3 retries each; count the retries the budget lets through."""
    rng = random.Random(0)
    retries = 0
    for i in range(requests):
        now = start + i / rate
        budget.record_request(now)
        attempt = 1
        while THREE_RETRIES.decide(FAILING, attempt=attempt, method="GET", replayable=True, rng=rng).retry:
            if not budget.try_withdraw(now):
                break
            retries += 1
            attempt += 1
            budget.retry_finished()
        budget.request_finished()
    return retries


def test_storm_is_capped_at_percent_plus_reserve() -> None:
    budget = RetryBudget()  # 20 %, 10 retries/s reserve over 10 s
    retries = storm(budget, 10_000, rate=1000.0)  # within one ttl
    reserve = 10 * 10
    assert retries <= 0.2 * 10_000 + reserve
    assert retries >= 0.2 * 10_000  # the budget is spent, not wasted
    # without a budget the policy alone would have sent 30,000 retries
    stats = budget.stats(10.0)
    assert stats.retries == retries
    assert stats.rejected >= 10_000 - reserve


def test_steady_storm_over_many_ttls() -> None:
    budget = RetryBudget()
    duration = 100.0
    retries = storm(budget, 10_000, rate=100.0)
    assert retries <= 0.2 * 10_000 + 10 * (duration + 10)


@settings(max_examples=25, deadline=None)
@given(
    percent=st.sampled_from([0.0, 5.0, 20.0, 50.0]),
    rate=st.sampled_from([5.0, 50.0, 500.0]),
    requests=st.integers(min_value=1, max_value=3000),
    min_rps=st.sampled_from([0.0, 1.0, 10.0]),
)
def test_storm_bound_property(percent: float, rate: float, requests: int, min_rps: float) -> None:
    budget = RetryBudget(percent, min_retries_per_second=min_rps, min_retry_concurrency=None)
    retries = storm(budget, requests, rate=rate, start=123.4)
    duration = requests / rate
    assert retries <= percent / 100 * requests + min_rps * (duration + budget.ttl) + 1


def test_recovers_after_ttl() -> None:
    budget = RetryBudget(min_retries_per_second=1.0)
    storm(budget, 1000, rate=1000.0)
    assert not budget.try_withdraw(1.0)
    assert budget.stats(1.0).balance < 1
    # deposits and withdrawals expire: after a quiet ttl the reserve is whole again
    assert budget.try_withdraw(12.0)
    budget.retry_finished()
    assert budget.stats(12.0).balance == 9


def test_low_traffic_can_still_retry() -> None:
    budget = RetryBudget()
    ok = 0
    for second in range(60):  # one request a second: 20 % would be 0.2 retries
        budget.record_request(float(second))
        if budget.try_withdraw(float(second)):
            ok += 1
            budget.retry_finished()
        budget.request_finished()
    assert ok == 60


def test_concurrent_retries_follow_envoys_rule() -> None:
    budget = RetryBudget(percent=20.0, min_retries_per_second=1000.0, min_retry_concurrency=3)
    for _ in range(10):
        budget.record_request(0.0)
    # max(3, 20 % of 10 requests) = 3 retries in flight
    assert [budget.try_withdraw(0.0) for _ in range(4)] == [True, True, True, False]
    budget.retry_finished()
    assert budget.try_withdraw(0.0)
    for _ in range(90):
        budget.record_request(0.0)
    assert budget.stats(0.0).max_retries_in_flight == 20
    assert sum(budget.try_withdraw(0.0) for _ in range(30)) == 17


def test_from_policy() -> None:
    mesh = RetryBudgetDefaults()
    budget = RetryBudget.from_policy(mesh)
    assert budget is not None
    assert (budget.percent, budget.min_retry_concurrency) == (20.0, 3)
    dr = RetryBudgetSpec.model_validate({"percent": {"value": 5}, "minRetryConcurrency": 1})
    budget = RetryBudget.from_policy(mesh, dr)
    assert budget is not None
    assert (budget.percent, budget.min_retry_concurrency) == (5.0, 1)
    assert RetryBudget.from_policy(None, None) is None


def test_threads_keep_counts_consistent() -> None:
    budget = RetryBudget(min_retries_per_second=0.0, min_retry_concurrency=None)
    granted: list[int] = []

    def worker() -> None:
        n = 0
        for _ in range(2000):
            budget.record_request(1.0)
            if budget.try_withdraw(1.0):
                n += 1
                budget.retry_finished()
            budget.request_finished()
        granted.append(n)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = budget.stats(1.0)
    assert sum(granted) == stats.retries <= 0.2 * 16_000
    assert stats.active_requests == stats.retries_in_flight == 0
