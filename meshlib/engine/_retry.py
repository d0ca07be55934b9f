"""Retry decisions: may this attempt's outcome be retried, and after how long?

A :class:`RetryPolicy` is compiled once per route from Istio's ``retries`` (or the
mesh default when the route sets none) and is immutable, like urllib3's ``Retry``:
one instance serves every concurrent request of the route. ``decide`` is a pure
function of the outcome, the attempt number, the method and an injected
``random.Random``; the adapter does the waiting (capped by the request's deadline)
and asks the destination's :class:`~._budget.RetryBudget` before it retries.

Where meshlib differs from Envoy, on purpose:

- **Non-idempotent methods** (POST, PATCH, anything but GET, HEAD, OPTIONS, TRACE,
  PUT, DELETE) are retried only when the upstream provably never saw the request
  (``Outcome.never_sent``: connect failure, refused stream), unless the policy is
  compiled with ``retry_non_idempotent=True``. Envoy retries a POST after a reset
  or a 503, which can charge a card twice.
- **Idempotent requests whose connection broke** (``reset``) are retried under the
  mesh default policy, which Istio's default (no ``reset``) would give back to the
  caller: RFC 9110 §9.2.2 lets a client repeat an idempotent request when the
  connection fails before the response. A route or MeshConfig that sets its own
  ``retryOn`` gets exactly what it lists.
- **Local overflow** (the pool was full) is never retried, as in Envoy: the retry
  would meet the same full pool.
- The retriable status codes are Istio's (``parseRetryOn``): a route that sets
  ``retryOn`` retries exactly the numeric codes listed there (``retriable-status-codes``
  alone then matches no status); the mesh default's ``retriableStatusCodes`` (503)
  apply only to a route without ``retryOn`` (or with no ``retries`` at all).

gRPC conditions have no HTTP status of their own: ``unavailable`` matches a 503 (the
status gRPC maps UNAVAILABLE to) or grpc-status 14; ``cancelled``,
``deadline-exceeded``, ``resource-exhausted`` and ``internal`` match only a response
carrying that grpc-status, never a plain HTTP response. ``retriable-headers``,
``envoy-ratelimited`` and ``http3-post-connect-failure`` look at what an ``Outcome``
does not carry, so they never match.

Tests that exercise retries should not sleep: ``set_testing(True)`` (or ``with
set_testing(True):``) makes every delay 0, as ``stamina.set_testing`` does.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from types import TracebackType
from typing import cast

from tenacity import RetryCallState, wait_exponential

from ..policy._meshkinds import DEFAULT_RETRY_ON, RetryDefaults
from ..policy._networking import HTTPRetry
from ._outcome import Failure, Outcome

__all__ = [
    "DEFAULT_BACKOFF_BASE",
    "IDEMPOTENT_METHODS",
    "MAX_RETRY_AFTER",
    "RetryDecision",
    "RetryPolicy",
    "RetryReason",
    "is_testing",
    "set_testing",
]

DEFAULT_BACKOFF_BASE = 0.025
"""Envoy's base retry interval (25 ms); the cap is 10 times the base."""

MAX_RETRY_AFTER = 300.0
"""A longer ``Retry-After`` is discarded for the usual backoff (Envoy's ``max_interval`` default):
a request with no deadline must not hang for whatever a server asks."""

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""RFC 9110 idempotent methods: repeating them has the effect of doing them once."""

_GRPC_CODES = {"cancelled": 1, "deadline-exceeded": 4, "resource-exhausted": 8, "internal": 13, "unavailable": 14}
_NO_RESPONSE = frozenset({Failure.CONNECT_FAILURE, Failure.REFUSED_STREAM, Failure.RESET, Failure.TIMEOUT})


# ---------------------------------------------------------------------------- testing switch

_testing = False


class _Testing:
    """Returned by :func:`set_testing`; as a context manager it restores the previous mode."""

    __slots__ = ("_previous",)

    def __init__(self, previous: bool) -> None:
        self._previous = previous

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        global _testing
        _testing = self._previous


def set_testing(on: bool) -> _Testing:
    """Make every retry delay 0 (``True``) so test suites never sleep; process-wide.

    Use it plainly (``set_testing(True)`` in a fixture, ``set_testing(False)`` after)
    or as ``with set_testing(True): ...``, which restores the previous mode on exit.
    """
    global _testing
    previous, _testing = _testing, bool(on)
    return _Testing(previous)


def is_testing() -> bool:
    """Whether :func:`set_testing` turned delays off."""
    return _testing


# ---------------------------------------------------------------------------- decisions


class RetryReason(enum.Enum):
    """Why ``decide`` answered as it did (for metrics, logs and the adapter's error)."""

    RETRY = "retry"
    NOT_RETRIABLE = "not-retriable"
    """The outcome matches no ``retryOn`` condition (successes land here too)."""
    DISABLED = "disabled"
    """The route's retries are off (``attempts: 0``)."""
    ATTEMPTS_EXHAUSTED = "attempts-exhausted"
    """``1 + attempts`` requests were made (Envoy flag URX when the last one failed)."""
    NON_IDEMPOTENT = "non-idempotent"
    """The method is not idempotent and the upstream may have acted on the request."""
    NOT_REPLAYABLE = "not-replayable"
    """The request body was streamed and cannot be sent again."""


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Retry after ``delay`` seconds, or do not, with the reason."""

    retry: bool
    reason: RetryReason
    delay: float = 0.0


_NO = {reason: RetryDecision(False, reason) for reason in RetryReason if reason is not RetryReason.RETRY}


@dataclass(frozen=True, slots=True)
class _Attempt:
    """The one field of tenacity's ``RetryCallState`` its wait strategies read."""

    attempt_number: int


def _jitter_windows(base: float, cap: float) -> tuple[float, ...]:
    """Envoy's jitter windows ``(2^N - 1) * base`` for N = 1, 2, ..., ending at the first above the cap.

    Envoy stops growing the window once it passes the cap (and then caps the draw),
    so later retries keep a real spread instead of all waiting exactly the cap.
    tenacity's ``wait_exponential`` gives ``base * 2^N``, bounded by ``max``; the
    window is that minus ``base``. Computed once per policy, never per request.
    """
    if base <= 0:
        return (0.0,)
    strategy = wait_exponential(multiplier=base, exp_base=2)
    out: list[float] = []
    n = 1
    while True:
        window = strategy(cast(RetryCallState, _Attempt(n + 1))) - base
        out.append(window)
        if window > cap or n >= 64:
            return tuple(out)
        n += 1


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A route's retry rules, compiled once and shared by all its requests.

    ``attempts`` is the number of retries (at most ``1 + attempts`` requests).
    ``per_try_timeout`` (seconds, ``None`` = the route's timeout) is for the adapter.
    """

    attempts: int = 0
    per_try_timeout: float | None = None
    conditions: frozenset[str] = frozenset()
    status_codes: frozenset[int] = frozenset()
    retry_non_idempotent: bool = False
    avoid_previous_hosts: bool = True
    """Retries prefer an endpoint not tried yet (``retryIgnorePreviousHosts``, default true)."""
    idempotent_resets: bool = False
    """Retry a GET, HEAD, OPTIONS, TRACE, PUT or DELETE whose connection broke (the mesh default only)."""
    backoff_base: float = DEFAULT_BACKOFF_BASE
    backoff_cap: float = 10 * DEFAULT_BACKOFF_BASE
    _windows: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _grpc: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_windows", _jitter_windows(self.backoff_base, self.backoff_cap))
        object.__setattr__(self, "_grpc", frozenset(_GRPC_CODES[c] for c in self.conditions if c in _GRPC_CODES))

    @classmethod
    def compile(
        cls, route: HTTPRetry | None, default: RetryDefaults | None = None, *, retry_non_idempotent: bool = False
    ) -> RetryPolicy:
        """The policy of a route: its ``retries``, else the mesh's ``defaultRetry``.

        A route's ``retries`` without ``retryOn`` takes the mesh default's conditions
        and status codes (Istio's translation starts from the default policy); a
        route's ``retryOn`` replaces both, its numeric entries being the only
        retriable status codes (Istio's ``parseRetryOn``). ``backoff`` sets the base
        interval; the cap is 10 times it, as in Envoy. ``retryIgnorePreviousHosts:
        false`` lets a retry go back to an endpoint already tried (by default a retry
        prefers one not tried yet). ``retry_non_idempotent`` comes from the
        VirtualService's ``meshlib.io/retry-non-idempotent`` annotation (Istio has no field).
        """
        default = default if default is not None else RetryDefaults()
        if route is None:
            attempts, per_try, retry_on, base = default.attempts, default.per_try_timeout, default.retry_on, None
        else:
            attempts, per_try, base = route.attempts, route.per_try_timeout, route.backoff
            retry_on = route.retry_on if route.retry_on is not None else default.retry_on
        own_retry_on = route is not None and route.retry_on is not None
        conditions: set[str] = set()
        codes: set[int] = set()
        for raw in retry_on.split(","):
            token = raw.strip()
            if token.isdigit():
                codes.add(int(token))
            elif token:
                conditions.add(token)
        if not own_retry_on and "retriable-status-codes" in conditions:
            codes.update(default.retriable_status_codes)
        base = base if base is not None else DEFAULT_BACKOFF_BASE
        return cls(
            attempts=attempts,
            per_try_timeout=per_try,
            conditions=frozenset(conditions),
            status_codes=frozenset(codes),
            retry_non_idempotent=retry_non_idempotent,
            avoid_previous_hosts=route is None or route.retry_ignore_previous_hosts is not False,
            idempotent_resets=not own_retry_on and retry_on == DEFAULT_RETRY_ON,
            backoff_base=base,
            backoff_cap=10 * base,
        )

    def retriable(self, outcome: Outcome) -> bool:
        """Whether ``outcome`` matches one of the ``retryOn`` conditions (ignoring method and attempts)."""
        failure = outcome.failure
        c = self.conditions
        if failure is not None:
            if failure is Failure.OVERFLOW:
                return False
            if "5xx" in c or "gateway-error" in c or "reset" in c:
                return True
            if failure is Failure.CONNECT_FAILURE:
                return "connect-failure" in c or "reset-before-request" in c
            if failure is Failure.REFUSED_STREAM:
                return "refused-stream" in c or "reset-before-request" in c
            return False
        status = outcome.status
        if status is None:
            return False
        if status in self.status_codes:
            return True
        if 500 <= status <= 599 and "5xx" in c:
            return True
        if status in (502, 503, 504) and "gateway-error" in c:
            return True
        if status == 409 and "retriable-4xx" in c:
            return True
        if status == 503 and "unavailable" in c:
            return True
        if self._grpc:
            grpc_status: int | None = getattr(outcome, "grpc_status", None)
            return grpc_status in self._grpc
        return False

    def decide(
        self, outcome: Outcome, *, attempt: int, method: str, replayable: bool, rng: random.Random
    ) -> RetryDecision:
        """Whether to retry after attempt number ``attempt`` (the first try is 1) ended in ``outcome``.

        The delay is ``outcome.retry_after`` when the upstream sent one, else the
        jittered backoff; the adapter caps it by the time left before the deadline.
        """
        if not self.retriable(outcome) and not (
            self.idempotent_resets and outcome.failure is Failure.RESET and method.upper() in IDEMPOTENT_METHODS
        ):
            return _NO[RetryReason.NOT_RETRIABLE]
        if self.attempts == 0:
            return _NO[RetryReason.DISABLED]
        if attempt > self.attempts:
            return _NO[RetryReason.ATTEMPTS_EXHAUSTED]
        if not self.retry_non_idempotent and not outcome.never_sent and method.upper() not in IDEMPOTENT_METHODS:
            return _NO[RetryReason.NON_IDEMPOTENT]
        if not replayable:
            return _NO[RetryReason.NOT_REPLAYABLE]
        if outcome.retry_after is not None and outcome.retry_after <= MAX_RETRY_AFTER:
            delay = 0.0 if _testing else max(0.0, outcome.retry_after)
        else:
            delay = self.backoff(attempt, rng)
        return RetryDecision(True, RetryReason.RETRY, delay)

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Envoy's full-jitter backoff before retry number ``attempt`` (1 = the first retry).

        Uniform in ``[0, (2^N - 1) * base)``, the draw capped at ``10 * base``; 0 in
        testing mode. The draw uses the injected ``rng``: tenacity's
        ``wait_random_exponential`` calls the global ``random.uniform``, so only its
        deterministic window (``wait_exponential``) is taken from tenacity.
        """
        if _testing:
            return 0.0
        windows = self._windows
        window = windows[min(max(attempt, 1), len(windows)) - 1]
        return min(rng.random() * window, self.backoff_cap)

    @property
    def max_backoff(self) -> float:
        """The longest backoff this policy can return (not counting ``Retry-After``)."""
        return min(self._windows[-1], self.backoff_cap)

    @property
    def max_requests(self) -> int:
        """At most this many requests per call: the first try and ``attempts`` retries."""
        return 1 + self.attempts
