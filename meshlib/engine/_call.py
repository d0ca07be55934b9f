"""One logical request to a destination, attempt by attempt: the decisions, not the IO.

Every adapter (the async and sync httpx transports, the sidecar's outbound side)
runs the same small loop around a ``Call``::

    attempt = call.next_attempt(now)          # Refusal, or an Attempt to send
    ... send to attempt.address within attempt.timeout ...
    verdict = call.finish(attempt, outcome, now)
    if verdict.retry: wait verdict.delay, go again; else answer

so the endpoint picked, the retry decision, what the breaker, outlier detector,
budget, pool and balancer learn, and which error the caller sees are decided here
once, for every mode.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .._exceptions import (
    CircuitOpenError,
    DeadlineExceededError,
    NoHealthyUpstreamError,
    RequestPathError,
    RetriesExhaustedError,
)
from ..policy import Endpoint
from ._destination import Destination
from ._outcome import Failure, Outcome
from ._pool import Admission
from ._retry import RetryPolicy
from ._tls import TlsOrigination

__all__ = ["Attempt", "Call", "Refusal", "Verdict"]


@dataclass(slots=True)
class Attempt:
    """One try: where to send it and how long it may take."""

    number: int
    """1 for the first try, 2 for the first retry..."""
    key: str
    endpoint: Endpoint | None
    address: str
    port: int
    timeout: float | None
    """Seconds this attempt may take (per-try timeout and the remaining deadline); None = no limit."""
    queued: bool = False
    """The pool is full: wait for ``Call.promote`` before sending."""
    budgeted: bool = False
    held: float | None = None
    """Set while the caller reads the response (``finish(hold=True)``): the attempt's duration."""
    close_connection: bool = False
    """Send ``connection: close``: the destination allows one request per connection
    (``maxRequestsPerConnection: 1``, keep-alive off)."""
    deadline_bound: bool = False
    """``timeout`` is the time left before the request's deadline (not a shorter per-try timeout):
    timing out means the deadline passed."""
    tls: TlsOrigination | None = None
    """The TLS to speak to the endpoint (None: plaintext)."""

    @property
    def is_retry(self) -> bool:
        return self.number > 1


@dataclass(frozen=True, slots=True)
class Refusal:
    """The request cannot go (now): the error to raise, with Envoy's response flag."""

    error: type[RequestPathError]
    message: str

    @property
    def flag(self) -> str:
        return self.error.response_flag


@dataclass(frozen=True, slots=True)
class Verdict:
    """After an attempt: retry after ``delay``, or stop.

    When stopping with a response, the adapter returns it. Without one, ``error`` is
    the error to raise (``None``: re-raise what the single attempt raised, so a
    caller without retries sees httpx's own exception).
    """

    retry: bool
    delay: float = 0.0
    reason: str = ""
    error: type[RequestPathError] | None = None
    flag: str = ""


_DONE = Verdict(False, reason="done")


class Call:
    """The decisions for one request; not shared between requests."""

    __slots__ = (
        "_closed",
        "_hash_key",
        "_rng",
        "_tried",
        "attempts",
        "deadline",
        "destination",
        "method",
        "replayable",
        "retry",
    )

    def __init__(
        self,
        destination: Destination,
        retry: RetryPolicy,
        *,
        method: str,
        replayable: bool,
        deadline: float | None,
        now: float,
        rng: random.Random,
        hash_key: bytes | str | None = None,
    ) -> None:
        self.destination = destination
        self.retry = retry
        self.method = method
        self.replayable = replayable
        self.deadline = deadline
        self.attempts = 0
        self._rng = rng
        self._hash_key = hash_key
        self._tried: set[str] = set()
        self._closed = False
        if destination.budget is not None:
            destination.budget.record_request(now)

    # -- before sending -----------------------------------------------------------

    def next_attempt(self, now: float) -> Attempt | Refusal:
        """Pick the endpoint for the next try, or refuse at once (open breaker, full pool, no endpoint)."""
        result = self._next(now)
        if isinstance(result, Refusal) and self.attempts > 0 and self.destination.budget is not None:
            self.destination.budget.retry_finished()  # the retry withdrawn for it will not run
        return result

    def _next(self, now: float) -> Attempt | Refusal:
        dest = self.destination
        number = self.attempts + 1
        if self.deadline is not None and now >= self.deadline:
            return Refusal(DeadlineExceededError, f"deadline exceeded before attempt {number} to {dest.host}")
        if dest.dns_target is not None:
            endpoint: Endpoint | None = None
            key = f"{dest.dns_target[0]}:{dest.dns_target[1]}"
            address, port = dest.dns_target
        else:
            ejected = dest.outlier.ejected(now)
            avoid = self._tried if self.retry.avoid_previous_hosts else None
            exclude: frozenset[str] | set[str] = ejected | avoid if avoid else ejected
            endpoint = dest.balancer.pick(self._rng, exclude=exclude, hash_key=self._hash_key)
            if endpoint is None and self._tried:
                # Every healthy endpoint was tried: a retry may go back to one of them.
                endpoint = dest.balancer.pick(self._rng, exclude=ejected, hash_key=self._hash_key)
            if endpoint is None:
                why = "every endpoint is ejected" if dest.endpoints else "it has no endpoints"
                return Refusal(NoHealthyUpstreamError, f"no healthy upstream for {dest.name}: {why}")
            key = dest.balancer.key_of(endpoint)
            address, port = dest.targets[key]
        if not dest.breaker.allow(now):
            return Refusal(CircuitOpenError, f"circuit breaker for {dest.name} is {dest.breaker.state}")
        admission = dest.pool.try_acquire(is_retry=number > 1)
        if admission is Admission.REJECT:
            dest.counters.pool_overflows += 1
            dest.breaker.release_probe()
            return Refusal(CircuitOpenError, f"connection pool of {dest.name} is full (overflow)")
        self.attempts = number
        self._tried.add(key)
        if endpoint is not None:
            dest.balancer.start(endpoint)
        timeout, bound = self._attempt_timeout(now)
        return Attempt(
            number,
            key,
            endpoint,
            address,
            port,
            timeout,
            queued=admission is Admission.QUEUE,
            close_connection=dest.close_connections,
            deadline_bound=bound,
            tls=dest.tls.get(key),
        )

    def _attempt_timeout(self, now: float) -> tuple[float | None, bool]:
        """The attempt's timeout, and whether it is the deadline's (rather than the per-try timeout)."""
        per_try = self.retry.per_try_timeout
        if self.deadline is None:
            return per_try, False
        remaining = max(0.0, self.deadline - now)
        if per_try is None or remaining <= per_try:
            return remaining, True
        return per_try, False

    def promote(self, attempt: Attempt, now: float) -> bool:
        """A queued attempt may go once the pool frees a slot; refresh its timeout then."""
        if self.destination.pool.promote():
            attempt.queued = False
            attempt.timeout, attempt.deadline_bound = self._attempt_timeout(now)
            return True
        return False

    # -- after sending ------------------------------------------------------------

    def abandon(self, attempt: Attempt) -> None:
        """The attempt ended without an outcome to learn from (cancelled, or it never left the queue)."""
        dest = self.destination
        if attempt.queued:
            dest.pool.dequeue(is_retry=attempt.is_retry)
        else:
            dest.pool.release(is_retry=attempt.is_retry)
        if attempt.endpoint is not None:
            dest.balancer.finish(attempt.endpoint, 0.0)
        dest.breaker.release_probe()
        self._end_retry(attempt)

    def finish(self, attempt: Attempt, outcome: Outcome, now: float, *, hold: bool = False) -> Verdict:
        """Learn from the attempt's outcome and decide: retry after a delay, or stop.

        ``hold``: the adapter streams the response body to the caller if the verdict
        is to stop. The attempt then keeps its pool slot and counts as in flight on
        its endpoint (as Envoy counts a stream until it ends) until :meth:`release`,
        which the adapter calls when the body is closed.
        """
        dest = self.destination
        if attempt.endpoint is not None and dest.outlier.record(attempt.key, outcome, now):
            dest.counters.ejections += 1
        dest.breaker.record(outcome, now)
        self._end_retry(attempt)
        verdict = self._verdict(attempt, outcome, now)
        if hold and not verdict.retry and outcome.failure is None:
            attempt.held = outcome.duration
        else:
            self._free(attempt, outcome.duration)
        return verdict

    def release(self, attempt: Attempt) -> None:
        """The response a held attempt answered with is closed: free its slot (once; later calls do nothing)."""
        duration, attempt.held = attempt.held, None
        if duration is not None:
            self._free(attempt, duration)

    def _free(self, attempt: Attempt, duration: float) -> None:
        self.destination.pool.release(is_retry=attempt.is_retry)
        if attempt.endpoint is not None:
            self.destination.balancer.finish(attempt.endpoint, duration)

    def _verdict(self, attempt: Attempt, outcome: Outcome, now: float) -> Verdict:
        dest = self.destination
        decision = self.retry.decide(
            outcome, attempt=attempt.number, method=self.method, replayable=self.replayable, rng=self._rng
        )
        if outcome.failure is Failure.TIMEOUT and attempt.deadline_bound:
            # The attempt ran until the request's deadline: nothing is left for a retry.
            return Verdict(False, reason="deadline", error=DeadlineExceededError, flag="UT")
        if not decision.retry:
            if outcome.failure is None:
                return _DONE
            if attempt.number > 1:
                return Verdict(False, reason=decision.reason.value, error=RetriesExhaustedError, flag="URX")
            return Verdict(False, reason=decision.reason.value)
        if self.deadline is not None and now + decision.delay >= self.deadline:
            late: type[RequestPathError] | None = DeadlineExceededError if outcome.failure is not None else None
            return Verdict(False, reason="deadline", error=late, flag="UT" if late else "")
        if dest.budget is not None and not dest.budget.try_withdraw(now):
            dest.counters.retry_budget_exhausted += 1
            spent: type[RequestPathError] | None = RetriesExhaustedError if outcome.failure is not None else None
            return Verdict(False, reason="retry budget exhausted", error=spent, flag="URX")
        dest.counters.retries += 1
        return Verdict(True, delay=decision.delay, reason=decision.reason.value)

    def _end_retry(self, attempt: Attempt) -> None:
        if attempt.is_retry and self.destination.budget is not None:
            self.destination.budget.retry_finished()

    def close(self) -> None:
        """The request is over (answered, failed or cancelled)."""
        if not self._closed:
            self._closed = True
            if self.destination.budget is not None:
                self.destination.budget.request_finished()
