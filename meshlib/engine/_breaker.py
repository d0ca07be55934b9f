"""Circuit breaker per destination: stop calling a destination that keeps failing.

Istio's DestinationRule has no breaker of this kind (its "circuit breaking" is the
connection-pool limits and outlier ejection of single hosts). meshlib turns one on
by default for every destination, like Linkerd's failure accrual: after
``fail_max`` (7) consecutive failures the destination is answered at once with
``CircuitOpenError`` for a penalty, then one probe request is let through; a probe
success closes the breaker, a probe failure reopens it with a longer penalty.

The state machine is **pybreaker**'s (so its Redis storage can share the state
between processes), driven without its timing and without holding its lock across
a request: outcomes are fed by ``CircuitBreaker.call`` with a trivial synchronous
function that returns (success) or raises (failure), which holds pybreaker's lock
for microseconds. pybreaker reads the wall clock to leave the open state; meshlib
never lets it: ``allow(now)`` keeps its own ``opened_at`` in ``now`` units and
calls ``half_open()`` itself when the penalty is over.

Penalty (Linkerd's exponential backoff): ``reset_timeout * 2^k`` after the k-th
consecutive reopen, capped at ``max_reset_timeout`` (60 s), plus a jitter of up to
``jitter`` (0.5) times that (never past the cap), so callers that opened together
do not probe together. A close resets k.
"""

from __future__ import annotations

import contextlib
import random
import threading
from dataclasses import dataclass

import pybreaker

from ._outcome import Failure, Outcome

__all__ = ["Breaker", "BreakerStats"]

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN


class _Failed(Exception):
    """Raised inside pybreaker's ``call`` to record one failure."""


def _succeed() -> None:
    return None


def _fail() -> None:
    raise _Failed  # a fresh instance each time: a shared one would grow its traceback


@dataclass(frozen=True, slots=True)
class BreakerStats:
    """A snapshot for metrics."""

    state: str
    consecutive_failures: int
    opens: int
    rejected: int
    reset_timeout: float
    """The penalty in force (or the next one, when closed)."""


class Breaker:
    """One destination's circuit breaker, shared by its concurrent requests.

    Before an attempt: ``allow(now)``; ``False`` means answer ``CircuitOpenError``
    at once. After it: ``record(outcome, now)``. A failure is ``outcome.is_5xx``
    (5xx, reset, timeout, connect failure); a local pool overflow is not the
    destination's fault and does not count. If an allowed attempt is abandoned
    before it has an outcome, call ``release_probe()`` so a half-open breaker can
    probe again.
    """

    def __init__(
        self,
        *,
        fail_max: int = 7,
        reset_timeout: float = 1.0,
        max_reset_timeout: float = 60.0,
        jitter: float = 0.5,
        success_threshold: int = 1,
        rng: random.Random | None = None,
        state_storage: pybreaker.CircuitBreakerStorage | None = None,
        name: str | None = None,
    ) -> None:
        if fail_max < 1 or success_threshold < 1:
            raise ValueError("fail_max and success_threshold must be at least 1")
        if reset_timeout <= 0 or max_reset_timeout < reset_timeout or jitter < 0:
            raise ValueError("need 0 < reset_timeout <= max_reset_timeout and jitter >= 0")
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            success_threshold=success_threshold,
            state_storage=state_storage,
            name=name,
        )
        self.base_reset_timeout = reset_timeout
        self.max_reset_timeout = max_reset_timeout
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self._lock = threading.Lock()
        self._opened_at: float | None = None
        self._timeout = reset_timeout
        self._reopens = 0
        self._probe = False
        self._opens = 0
        self._rejected = 0

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"`` (as stored: shared when the storage is)."""
        return self._cb.current_state

    @property
    def breaker(self) -> pybreaker.CircuitBreaker:
        """The underlying pybreaker breaker (for listeners; do not ``call`` it across IO)."""
        return self._cb

    def _penalty(self) -> float:
        base = min(self.max_reset_timeout, self.base_reset_timeout * 2.0 ** min(self._reopens, 64))
        extra = min(self.max_reset_timeout - base, base * self.jitter * self._rng.random())
        return base + extra

    def _opened(self, now: float) -> None:
        # Called with self._lock held, right after pybreaker moved to open.
        self._timeout = self._penalty()
        self._cb.reset_timeout = self._timeout
        self._reopens += 1
        self._opened_at = now
        self._probe = False
        self._opens += 1

    def allow(self, now: float) -> bool:
        """May an attempt go to the destination now? ``False``: answer ``CircuitOpenError`` at once."""
        with self._lock:
            state = self._cb.current_state
            if state == CLOSED:
                return True
            if state == OPEN:
                if self._opened_at is None:  # opened by another process sharing the storage
                    self._opened_at = now
                if now < self._opened_at + self._timeout:
                    self._rejected += 1
                    return False
                self._cb.half_open()
                self._probe = True
                return True
            # half-open: one probe at a time
            if self._probe:
                self._rejected += 1
                return False
            self._probe = True
            return True

    def record(self, outcome: Outcome, now: float) -> None:
        """Learn from an attempt's outcome.

        Outcomes that arrive while open (requests sent before the trip) change
        nothing; in half-open the next outcome recorded is taken as the probe's.
        """
        if outcome.failure is Failure.OVERFLOW:
            self.release_probe()
            return
        failed = outcome.is_5xx
        with self._lock:
            state = self._cb.current_state
            if state == OPEN:
                return
            if state == HALF_OPEN:
                self._probe = False
            with contextlib.suppress(_Failed, pybreaker.CircuitBreakerError):
                self._cb.call(_fail if failed else _succeed)
            after = self._cb.current_state
            if after == OPEN:
                self._opened(now)
            elif after == CLOSED and state == HALF_OPEN:
                self._reopens = 0
                self._timeout = self.base_reset_timeout
                self._opened_at = None

    def release_probe(self) -> None:
        """The allowed probe was abandoned without an outcome: let the next request probe."""
        with self._lock:
            self._probe = False

    def stats(self) -> BreakerStats:
        """Counters for metrics."""
        with self._lock:
            return BreakerStats(
                state=self._cb.current_state,
                consecutive_failures=self._cb.fail_counter,
                opens=self._opens,
                rejected=self._rejected,
                reset_timeout=self._timeout,
            )
