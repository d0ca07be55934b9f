"""What happened to one attempt, as every engine sees it.

Adapters (the httpx transports, the sidecar) turn what their IO saw into an
``Outcome``; retry, outlier detection, the breaker and the balancer all learn from
the same value, so they can never disagree about what a failure was.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Failure", "Outcome"]


class Failure(enum.Enum):
    """Why an attempt produced no response. Names follow Envoy's retry conditions."""

    CONNECT_FAILURE = "connect-failure"
    """The connection could not be opened: nothing was sent (Envoy flag UF)."""
    REFUSED_STREAM = "refused-stream"
    """The upstream refused the request before reading it (HTTP/2 REFUSED_STREAM): nothing was processed."""
    RESET = "reset"
    """The connection broke after the request started: the upstream may have acted on it (UC)."""
    TIMEOUT = "timeout"
    """The per-try timeout ran out waiting for the response (UT)."""
    OVERFLOW = "overflow"
    """The destination's connection pool was full (UO); the request never left."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """An attempt's result: a response status, or a failure with no response."""

    status: int | None = None
    failure: Failure | None = None
    retry_after: float | None = None
    """Seconds the upstream asked us to wait (``Retry-After``), parsed by the adapter."""
    duration: float = 0.0
    """Seconds from sending to the outcome (for latency-aware balancing)."""

    @classmethod
    def response(cls, status: int, *, retry_after: float | None = None, duration: float = 0.0) -> Outcome:
        return cls(status=status, retry_after=retry_after, duration=duration)

    @classmethod
    def failed(cls, failure: Failure, *, duration: float = 0.0) -> Outcome:
        return cls(failure=failure, duration=duration)

    @property
    def never_sent(self) -> bool:
        """The upstream provably did not process the request: safe to retry any method."""
        return self.failure in (Failure.CONNECT_FAILURE, Failure.REFUSED_STREAM, Failure.OVERFLOW)

    @property
    def is_5xx(self) -> bool:
        """Envoy's ``5xx``: a 5xx status, or no response at all (reset, timeout, connect failure)."""
        if self.failure is not None:
            return self.failure is not Failure.OVERFLOW
        return self.status is not None and 500 <= self.status <= 599

    @property
    def is_gateway_error(self) -> bool:
        """Envoy's ``gateway-error``: 502, 503, 504, or no response (Envoy counts those too)."""
        if self.failure is not None:
            return self.failure is not Failure.OVERFLOW
        return self.status in (502, 503, 504)

    @property
    def ok(self) -> bool:
        return self.failure is None and self.status is not None and self.status < 500
