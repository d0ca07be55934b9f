"""Retry decisions: what a caller of a flaky upstream notices."""

from __future__ import annotations

import random
import statistics

import pytest

from meshlib.engine._outcome import Failure, Outcome
from meshlib.engine._retry import RetryDecision, RetryPolicy, RetryReason, is_testing, set_testing
from meshlib.policy._meshkinds import RetryDefaults
from meshlib.policy._networking import HTTPRetry


def policy(retry_on: str | None = None, attempts: int = 3, **kw: object) -> RetryPolicy:
    spec: dict[str, object] = {"attempts": attempts, **kw}
    if retry_on is not None:
        spec["retryOn"] = retry_on
    return RetryPolicy.compile(HTTPRetry.model_validate(spec), RetryDefaults())


def decide(
    p: RetryPolicy, outcome: Outcome, *, attempt: int = 1, method: str = "GET", replayable: bool = True
) -> RetryDecision:
    return p.decide(outcome, attempt=attempt, method=method, replayable=replayable, rng=random.Random(7))


RESET = Outcome.failed(Failure.RESET)
CONNECT = Outcome.failed(Failure.CONNECT_FAILURE)
REFUSED = Outcome.failed(Failure.REFUSED_STREAM)
TIMEOUT = Outcome.failed(Failure.TIMEOUT)
OVERFLOW = Outcome.failed(Failure.OVERFLOW)


def test_get_retried_on_503_with_5xx() -> None:
    d = decide(policy("5xx"), Outcome.response(503))
    assert d.retry
    assert d.reason is RetryReason.RETRY
    assert 0 <= d.delay < 0.025


def test_success_and_4xx_not_retried() -> None:
    p = policy("5xx")
    assert decide(p, Outcome.response(200)).reason is RetryReason.NOT_RETRIABLE
    assert decide(p, Outcome.response(404)).reason is RetryReason.NOT_RETRIABLE


def test_post_not_retried_after_reset_but_retried_after_connect_failure() -> None:
    p = policy("5xx")
    assert decide(p, RESET, method="POST").reason is RetryReason.NON_IDEMPOTENT
    assert decide(p, Outcome.response(503), method="POST").reason is RetryReason.NON_IDEMPOTENT
    assert decide(p, TIMEOUT, method="PATCH").reason is RetryReason.NON_IDEMPOTENT
    assert decide(p, CONNECT, method="POST").retry
    assert decide(p, REFUSED, method="POST").retry
    # PUT and DELETE are idempotent: retried as Envoy would
    assert decide(p, RESET, method="PUT").retry
    assert decide(p, RESET, method="delete").retry


def test_retry_non_idempotent_opt_in() -> None:
    p = RetryPolicy.compile(HTTPRetry(attempts=2, retry_on="5xx"), retry_non_idempotent=True)
    assert decide(p, RESET, method="POST").retry


def test_overflow_never_retried() -> None:
    assert decide(policy("5xx,reset,connect-failure"), OVERFLOW).reason is RetryReason.NOT_RETRIABLE


def test_409_only_with_retriable_4xx() -> None:
    assert not decide(policy("5xx"), Outcome.response(409)).retry
    assert decide(policy("retriable-4xx"), Outcome.response(409)).retry
    assert not decide(policy("retriable-4xx"), Outcome.response(429)).retry


def test_numeric_codes_in_retry_on() -> None:
    p = policy("429,502")
    assert decide(p, Outcome.response(429)).retry
    assert decide(p, Outcome.response(502)).retry
    assert not decide(p, Outcome.response(503)).retry
    assert not decide(p, RESET).retry


def test_gateway_error_and_reset_conditions() -> None:
    gw = policy("gateway-error")
    assert decide(gw, Outcome.response(504)).retry
    assert not decide(gw, Outcome.response(500)).retry
    assert decide(gw, TIMEOUT).retry
    reset = policy("reset")
    assert decide(reset, RESET).retry
    assert decide(reset, TIMEOUT).retry
    assert not decide(reset, Outcome.response(503)).retry
    before = policy("reset-before-request")
    assert decide(before, CONNECT).retry
    assert not decide(before, RESET).retry
    assert decide(policy("connect-failure"), CONNECT).retry
    assert not decide(policy("connect-failure"), REFUSED).retry
    assert decide(policy("refused-stream"), REFUSED).retry


def test_mesh_default_when_route_sets_none() -> None:
    p = RetryPolicy.compile(None, RetryDefaults())
    assert p.attempts == 2
    assert decide(p, Outcome.response(503)).retry  # retriable-status-codes(503)
    assert decide(p, CONNECT).retry
    assert not decide(p, Outcome.response(500)).retry
    assert decide(p, Outcome.response(503), attempt=3).reason is RetryReason.ATTEMPTS_EXHAUSTED


def test_the_mesh_default_retries_an_idempotent_request_whose_connection_broke() -> None:
    """RFC 9110 §9.2.2: safe to repeat; Istio's default would hand the reset to the caller."""
    p = RetryPolicy.compile(None, RetryDefaults())
    for method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE"):
        assert decide(p, RESET, method=method).retry, method
    assert decide(p, RESET, method="POST").reason is RetryReason.NOT_RETRIABLE, "a POST may have been acted on"
    assert decide(p, RESET, method="PATCH").reason is RetryReason.NOT_RETRIABLE
    own = RetryPolicy.compile(HTTPRetry(attempts=2, retry_on="connect-failure,503"), RetryDefaults())
    assert not decide(own, RESET).retry, "a route's own retryOn gets exactly what it lists"
    configured = RetryPolicy.compile(None, RetryDefaults(retry_on="connect-failure"))
    assert not decide(configured, RESET).retry, "so does a MeshConfig that sets its own"
    without_attempts = RetryPolicy.compile(HTTPRetry(attempts=0), RetryDefaults())
    assert not decide(without_attempts, RESET).retry


def test_route_retry_on_lists_exactly_its_codes_as_istio_parse_retry_on() -> None:
    defaults = RetryDefaults(retriable_status_codes=[503, 429])
    bare = RetryPolicy.compile(HTTPRetry(attempts=1, retry_on="retriable-status-codes"), defaults)
    assert bare.status_codes == frozenset()  # the route set retryOn: the mesh default's codes do not apply
    assert not decide(bare, Outcome.response(429)).retry
    assert not decide(bare, Outcome.response(503)).retry
    listed = RetryPolicy.compile(HTTPRetry(attempts=1, retry_on="retriable-status-codes,429"), defaults)
    assert listed.status_codes == frozenset({429})
    assert decide(listed, Outcome.response(429)).retry
    assert not decide(listed, Outcome.response(503)).retry


def test_mesh_default_codes_apply_when_the_route_has_no_retry_on() -> None:
    defaults = RetryDefaults(retriable_status_codes=[503, 429])
    for p in (RetryPolicy.compile(None, defaults), RetryPolicy.compile(HTTPRetry(attempts=1), defaults)):
        assert p.status_codes == frozenset({503, 429})
        assert decide(p, Outcome.response(429)).retry
        assert not decide(p, Outcome.response(500)).retry


def test_route_without_retry_on_uses_default_conditions() -> None:
    p = RetryPolicy.compile(HTTPRetry(attempts=5), RetryDefaults())
    assert p.attempts == 5
    assert decide(p, Outcome.response(503)).retry
    assert not decide(p, Outcome.response(500)).retry


def test_grpc_names() -> None:
    p = policy("unavailable,cancelled,deadline-exceeded,internal,resource-exhausted")
    assert decide(p, Outcome.response(503)).retry  # unavailable is 503-class
    for status in (500, 502, 504, 499, 429):
        assert not decide(p, Outcome.response(status)).retry, status


def test_attempts_zero_disables() -> None:
    p = RetryPolicy.compile(HTTPRetry(attempts=0), RetryDefaults())
    assert decide(p, CONNECT).reason is RetryReason.DISABLED


def test_attempts_exhausted() -> None:
    p = policy("5xx", attempts=2)
    assert decide(p, RESET, attempt=1).retry
    assert decide(p, RESET, attempt=2).retry
    assert decide(p, RESET, attempt=3).reason is RetryReason.ATTEMPTS_EXHAUSTED
    assert p.max_requests == 3


def test_body_not_replayable() -> None:
    assert decide(policy("5xx"), RESET, replayable=False).reason is RetryReason.NOT_REPLAYABLE


def test_per_try_timeout() -> None:
    assert policy("5xx", perTryTimeout="250ms").per_try_timeout == 0.25
    assert RetryPolicy.compile(None, RetryDefaults.model_validate({"perTryTimeout": "2s"})).per_try_timeout == 2.0
    assert RetryPolicy.compile(None, RetryDefaults()).per_try_timeout is None


@pytest.mark.parametrize(("retry", "window"), [(1, 0.025), (2, 0.075), (3, 0.175), (4, 0.25), (9, 0.25)])
def test_backoff_bounds_over_many_draws(retry: int, window: float) -> None:
    p = policy("5xx")
    rng = random.Random(1)
    draws = [p.backoff(retry, rng) for _ in range(20_000)]
    assert all(0 <= d <= 0.25 for d in draws)
    assert max(draws) <= window
    if retry <= 3:  # uniform on [0, window)
        assert statistics.fmean(draws) == pytest.approx(window / 2, rel=0.03)
    else:  # Envoy: window frozen at 375 ms, draw capped at 250 ms -> mean 1/6 s
        assert statistics.fmean(draws) == pytest.approx(0.25 * 2 / 3, rel=0.03)
        assert min(draws) < 0.01  # still jittered, not everyone waiting the cap


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    p = policy("5xx")
    a = [p.backoff(2, random.Random(42)) for _ in range(3)]
    b = [p.backoff(2, random.Random(42)) for _ in range(3)]
    assert a == b


def test_backoff_base_from_route() -> None:
    p = policy("5xx", backoff="100ms")
    assert p.backoff_cap == pytest.approx(1.0)
    rng = random.Random(3)
    assert max(p.backoff(1, rng) for _ in range(2000)) == pytest.approx(0.1, abs=0.002)


def test_retry_after_wins() -> None:
    d = decide(policy("5xx"), Outcome.response(503, retry_after=3.0))
    assert d.retry
    assert d.delay == 3.0


def test_testing_mode_makes_every_delay_zero() -> None:
    p = policy("5xx")
    with set_testing(True):
        assert is_testing()
        assert all(p.backoff(5, random.Random(i)) == 0 for i in range(100))
        assert decide(p, Outcome.response(503, retry_after=30.0)).delay == 0
    assert not is_testing()
    set_testing(True)
    try:
        assert decide(p, RESET).delay == 0
    finally:
        set_testing(False)
    assert p.backoff(5, random.Random(0)) > 0


def test_policy_is_immutable_and_shareable() -> None:
    p = policy("5xx")
    with pytest.raises(AttributeError):
        p.attempts = 9  # type: ignore[misc]
    assert p == policy("5xx")
    assert hash(p) == hash(policy("5xx"))
