"""Outlier detection per destination: eject the endpoints that keep failing.

Semantics are Envoy's, from Istio's ``outlierDetection``:

- Each endpoint counts consecutive 5xx (``consecutive5xxErrors``, default 5, 0 = off)
  and consecutive gateway errors (502/503/504, ``consecutiveGatewayErrors``, off by
  default). A non-5xx response resets both; a 5xx that is not a gateway error
  resets the gateway count. Resets, timeouts and connect failures count as both,
  as Envoy counts them when local-origin errors are not split. A pool overflow is
  local to the caller and never counts against an endpoint.
- Reaching a threshold ejects the endpoint **at once** (Envoy ejects on the event,
  not at the sweep) for ``baseEjectionTime * n``, n = how many times it has been
  ejected, capped at ``max(300 s, baseEjectionTime)``.
- At most ``maxEjectionPercent`` of the endpoints are ejected, but one endpoint may
  always be ejected (so 10 % of 3 endpoints still ejects one).
- Every ``interval`` a sweep returns endpoints whose time is up and lowers the
  multiplier n of each endpoint that stayed in for a whole interval. Sweeps run on
  a grid of ``interval`` from the first ``now`` the detector sees, whenever any
  method is called with a later ``now``, so no timer is needed (``tick`` exists
  for adapters that keep one); an endpoint comes back at the first sweep after
  its ejection ends, as in Envoy.
- ``minHealthPercent``: when fewer than that share of the endpoints are not
  ejected, ejection is ignored and every endpoint is used (Envoy's panic
  threshold; Istio's default 0 never panics).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from ..policy._networking import OutlierDetection
from ._outcome import Failure, Outcome

__all__ = ["OutlierDetector", "OutlierStats"]

MAX_EJECTION_TIME = 300.0
"""Envoy's default ``max_ejection_time`` (Istio does not expose it)."""


@dataclass(frozen=True, slots=True)
class OutlierStats:
    """A snapshot for metrics."""

    endpoints: int
    ejected: int
    ejections_total: int
    ejections_refused: int
    """Ejections ``maxEjectionPercent`` refused (Envoy's ``ejections_overflow``)."""
    panic: bool
    """Too few healthy endpoints (``minHealthPercent``): ejections are ignored."""


class _Host:
    __slots__ = ("ejected_until", "ejections", "five_xx", "gateway")

    def __init__(self) -> None:
        self.five_xx = 0
        self.gateway = 0
        self.ejections = 0
        self.ejected_until: float | None = None


class OutlierDetector:
    """One destination's ejection state, keyed by endpoint key (e.g. ``"10.0.0.3:80"``).

    ``policy=None`` (no ``outlierDetection`` in the DestinationRule) never ejects.
    Outcomes of keys not in the endpoint set are ignored.
    """

    def __init__(
        self,
        policy: OutlierDetection | None,
        endpoints: Iterable[str] = (),
        *,
        max_ejection_time: float = MAX_EJECTION_TIME,
    ) -> None:
        spec = policy if policy is not None else OutlierDetection()
        self.five_xx_threshold = spec.five_xx_threshold if policy is not None else 0
        self.gateway_error_threshold = spec.gateway_error_threshold if policy is not None else 0
        self.interval = spec.interval
        self.base_ejection_time = spec.base_ejection_time
        self.max_ejection_time = max(max_ejection_time, spec.base_ejection_time)
        self.max_ejection_percent = spec.max_ejection_percent
        self.min_health_percent = spec.min_health_percent
        self._hosts: dict[str, _Host] = {key: _Host() for key in endpoints}
        self._next_sweep: float | None = None
        self._cache: frozenset[str] = frozenset()
        self._panic = False
        self._active = 0
        self._total = 0
        self._refused = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether any threshold can eject an endpoint."""
        return self.five_xx_threshold > 0 or self.gateway_error_threshold > 0

    # -------------------------------------------------------------- internals (lock held)

    def _rebuild(self) -> None:
        ejected = [key for key, host in self._hosts.items() if host.ejected_until is not None]
        self._active = len(ejected)
        n = len(self._hosts)
        healthy = n - len(ejected)
        self._panic = bool(ejected) and self.min_health_percent > 0 and healthy * 100 < self.min_health_percent * n
        self._cache = frozenset() if self._panic else frozenset(ejected)

    def _sweep(self, now: float) -> None:
        nxt = self._next_sweep
        if nxt is None:
            self._next_sweep = now + self.interval
            return
        if now < nxt:
            return
        interval = self.interval
        due = math.floor((now - nxt) / interval) + 1  # sweeps at nxt + k * interval, k < due
        changed = False
        for host in self._hosts.values():
            until = host.ejected_until
            if until is not None:
                first = max(0, math.ceil((until - nxt) / interval - 1e-9))
                if first >= due:
                    continue
                host.ejected_until = None
                changed = True
                healthy_sweeps = due - 1 - first
            else:
                healthy_sweeps = due
            if host.ejections:
                host.ejections = max(0, host.ejections - healthy_sweeps)
        self._next_sweep = nxt + due * interval
        if changed:
            self._rebuild()

    def _eject(self, host: _Host, now: float) -> bool:
        if host.ejected_until is not None:
            return False
        n = len(self._hosts)
        if self._active > 0 and (self._active + 1) * 100 > self.max_ejection_percent * n:
            self._refused += 1
            return False
        if self.base_ejection_time * host.ejections < self.max_ejection_time:
            host.ejections += 1
        host.ejected_until = now + min(self.base_ejection_time * host.ejections, self.max_ejection_time)
        self._total += 1
        self._rebuild()
        return True

    # -------------------------------------------------------------- API

    def record(self, endpoint_key: str, outcome: Outcome, now: float) -> bool:
        """Count an attempt's outcome against its endpoint; ``True`` if this ejected the endpoint."""
        if outcome.failure is Failure.OVERFLOW or not self.enabled:
            return False
        with self._lock:
            self._sweep(now)
            host = self._hosts.get(endpoint_key)
            if host is None:
                return False
            if not outcome.is_5xx:
                host.five_xx = host.gateway = 0
                return False
            host.five_xx += 1
            if outcome.is_gateway_error:
                host.gateway += 1
            else:
                host.gateway = 0
            fired = False
            if self.five_xx_threshold and host.five_xx >= self.five_xx_threshold:
                host.five_xx = 0
                fired = True
            if self.gateway_error_threshold and host.gateway >= self.gateway_error_threshold:
                host.gateway = 0
                fired = True
            return fired and self._eject(host, now)

    def ejected(self, now: float) -> frozenset[str]:
        """The endpoints to skip now (empty in panic). Cached: O(1) unless a sweep is due."""
        nxt = self._next_sweep
        if nxt is None or now >= nxt:
            with self._lock:
                self._sweep(now)
        return self._cache

    def ejected_until(self, endpoint_key: str) -> float | None:
        """When ``endpoint_key``'s ejection ends (it returns at the first sweep after), or ``None``."""
        with self._lock:
            host = self._hosts.get(endpoint_key)
            return host.ejected_until if host is not None else None

    def tick(self, now: float) -> None:
        """Run the interval sweeps due by ``now`` (every other method does too)."""
        with self._lock:
            self._sweep(now)

    def set_endpoints(self, keys: Iterable[str]) -> None:
        """The endpoint set changed: keep the state of endpoints that remain, forget the others."""
        with self._lock:
            old = self._hosts
            self._hosts = {key: old.get(key) or _Host() for key in keys}
            self._rebuild()

    def stats(self) -> OutlierStats:
        """Counters for metrics."""
        with self._lock:
            return OutlierStats(
                endpoints=len(self._hosts),
                ejected=self._active,
                ejections_total=self._total,
                ejections_refused=self._refused,
                panic=self._panic,
            )
