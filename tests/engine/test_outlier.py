"""Outlier detection: a failing endpoint leaves the rotation, and comes back."""

from __future__ import annotations

import math
from typing import Any

from meshlib.engine._outcome import Failure, Outcome
from meshlib.engine._outlier import OutlierDetector
from meshlib.policy._networking import OutlierDetection

E500 = Outcome.response(500)
E502 = Outcome.response(502)
OK = Outcome.response(200)


def detector(n: int = 20, **spec: Any) -> OutlierDetector:
    d = OutlierDetector(OutlierDetection.model_validate(spec), [f"10.0.0.{i}:80" for i in range(n)])
    d.tick(0.0)  # sweeps every interval from t=0
    return d


def fail(d: OutlierDetector, key: str, now: float, n: int, outcome: Outcome = E500) -> list[bool]:
    return [d.record(key, outcome, now) for _ in range(n)]


A, B, C = "10.0.0.0:80", "10.0.0.1:80", "10.0.0.2:80"


def test_ejects_at_the_fifth_consecutive_5xx() -> None:
    d = detector()
    assert fail(d, A, 1.0, 5) == [False, False, False, False, True]
    assert d.ejected(1.0) == {A}
    assert d.ejected_until(A) == 31.0


def test_success_resets_the_count() -> None:
    d = detector()
    fail(d, A, 1.0, 4)
    d.record(A, OK, 1.0)
    assert fail(d, A, 1.0, 4) == [False] * 4
    assert d.ejected(1.0) == frozenset()


def test_connection_failures_count_overflow_does_not() -> None:
    d = detector()
    for _ in range(10):
        d.record(A, Outcome.failed(Failure.OVERFLOW), 1.0)
    assert d.ejected(1.0) == frozenset()
    fail(d, A, 1.0, 5, Outcome.failed(Failure.CONNECT_FAILURE))
    assert d.ejected(1.0) == {A}


def test_unejected_by_the_sweep_after_the_time() -> None:
    d = detector(interval="10s", baseEjectionTime="30s")
    fail(d, A, 1.0, 5)
    d.tick(30.0)
    assert d.ejected(30.0) == {A}
    d.tick(35.0)  # time is up at 31 s, but Envoy returns hosts at the interval sweep
    assert d.ejected(35.0) == {A}
    d.tick(40.0)
    assert d.ejected(40.0) == frozenset()


def test_ejected_runs_the_sweep_without_a_timer() -> None:
    d = detector(interval="10s")
    fail(d, A, 1.0, 5)
    assert d.ejected(39.9) == {A}
    assert d.ejected(40.0) == frozenset()


def test_ejection_time_doubles_and_decays() -> None:
    d = detector(interval="1s", baseEjectionTime="30s")
    fail(d, A, 0.5, 5)
    assert d.ejected_until(A) == 30.5
    assert d.ejected(31.0) == frozenset()
    fail(d, A, 31.5, 5)  # second ejection: twice as long
    assert d.ejected_until(A) == 91.5
    assert d.ejected(91.9) == {A}
    assert d.ejected(92.0) == frozenset()
    # healthy for two more intervals: the multiplier drops 2 -> 0, the next ejection is 30 s again
    d.tick(94.0)
    fail(d, A, 94.5, 5)
    assert d.ejected_until(A) == 124.5


def test_ejection_time_capped_at_300s() -> None:
    d = detector(interval="1s", baseEjectionTime="100s", maxEjectionPercent=100)
    durations = []
    now = 0.5
    for _ in range(5):  # never healthy for a whole interval: the multiplier only grows
        fail(d, A, now, 5)
        until = d.ejected_until(A)
        assert until is not None
        durations.append(until - now)
        now = math.ceil(until)  # the sweep that returns it; fail again before the next one
        assert d.ejected(now) == frozenset()
    assert durations == [100, 200, 300, 300, 300]


def test_max_ejection_percent() -> None:
    d = detector(20, maxEjectionPercent=10)
    keys = [f"10.0.0.{i}:80" for i in range(5)]
    ejected = [fail(d, k, 1.0, 5)[-1] for k in keys]
    assert ejected == [True, True, False, False, False]
    assert len(d.ejected(1.0)) == 2
    assert d.stats().ejections_refused == 3


def test_at_least_one_endpoint_may_be_ejected() -> None:
    d = detector(3)  # 10 % of 3 is 0.3 endpoints, but one may always go
    assert fail(d, A, 1.0, 5)[-1]
    assert not fail(d, B, 1.0, 5)[-1]
    assert d.ejected(1.0) == {A}


def test_min_health_percent_panics_back_to_all_endpoints() -> None:
    d = detector(3, maxEjectionPercent=100, minHealthPercent=50)
    fail(d, A, 1.0, 5)
    assert d.ejected(1.0) == {A}  # 2 of 3 healthy
    fail(d, B, 1.0, 5)
    assert d.ejected(1.0) == frozenset()  # 1 of 3 healthy < 50 %: use everyone
    assert d.stats().panic
    assert d.stats().ejected == 2


def test_gateway_errors() -> None:
    d = detector(consecutiveGatewayErrors=3, consecutive5xxErrors=0)
    fail(d, A, 1.0, 10, E500)
    assert d.ejected(1.0) == frozenset()
    fail(d, A, 1.0, 2, E502)
    d.record(A, E500, 1.0)  # a 500 is not a gateway error: the gateway count restarts
    assert fail(d, A, 1.0, 3, E502) == [False, False, True]


def test_deprecated_consecutive_errors_means_gateway_errors() -> None:
    d = detector(consecutiveErrors=2)
    assert fail(d, A, 1.0, 5, E500) == [False] * 5
    assert fail(d, A, 1.0, 2, Outcome.response(503)) == [False, True]


def test_no_policy_never_ejects() -> None:
    d = OutlierDetector(None, [A])
    assert not any(fail(d, A, 1.0, 100))
    assert d.ejected(1.0) == frozenset()


def test_set_endpoints_keeps_state_of_remaining() -> None:
    d = detector(3, maxEjectionPercent=100)
    fail(d, A, 1.0, 5)
    fail(d, B, 1.0, 4)
    d.set_endpoints([A, B, "10.0.0.9:80"])
    assert d.ejected(1.0) == {A}
    assert d.record(B, E500, 1.0)  # B's count of 4 survived
    d.set_endpoints([B])
    assert d.ejected(1.0) == {B}  # A's ejection is forgotten with A
    assert not d.record(A, E500, 1.0)  # gone: ignored
    assert d.stats().endpoints == 1


def test_ejected_set_is_cached() -> None:
    d = detector()
    fail(d, A, 1.0, 5)
    first = d.ejected(1.0)
    assert d.ejected(2.0) is first
    d.record(B, OK, 2.0)
    assert d.ejected(3.0) is first
