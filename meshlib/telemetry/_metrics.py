"""Prometheus metrics: Istio's RED metrics per request, and the engines' state at scrape time.

Request metrics are counted on the hot path, so ``RequestMetrics.observe`` looks
its children up in a plain dict instead of calling ``labels()`` (which validates
and locks on every call). Engine metrics (retries, ejections, breakers, pools,
rate limits, certificates, config version) cost the request path nothing: the
engines keep plain int counters and ``EngineCollector`` reads them when Prometheus
scrapes.

Labels are bounded by construction: services, workloads, subsets and principals
come from the mesh's configuration, never from the request; no path, no client IP.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine import Inbound, Outbound
from ..engine._destination import Destination
from ..engine._ratelimit import RateLimiterEngine
from ..security import WorkloadCertificates
from ._record import RequestRecord

__all__ = [
    "DURATION_BUCKETS_MS",
    "MAX_CHILDREN",
    "REQUEST_LABELS",
    "EngineCollector",
    "EngineState",
    "RequestMetrics",
]

log = logging.getLogger("meshlib.telemetry")

DURATION_BUCKETS_MS = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)
"""Istio's ``istio_request_duration_milliseconds`` buckets, so dashboards built for Istio read ours."""

REQUEST_LABELS = (
    "reporter",
    "source_workload",
    "source_namespace",
    "source_principal",
    "destination_service",
    "destination_workload",
    "destination_namespace",
    "destination_subset",
    "request_protocol",
    "response_code",
    "response_flags",
    "connection_security_policy",
)
"""Istio's standard labels (``destination_version`` is ``destination_subset`` here), the same on all three."""

MAX_CHILDREN = 10_000
"""Label sets kept per request metric; beyond it identities fold into ``other`` (a guard, not a quota)."""

_OTHER = "other"
# Positions in REQUEST_LABELS of the identity labels folded on overflow.
_FOLDED = tuple(i for i, name in enumerate(REQUEST_LABELS) if name.startswith(("source_", "destination_")))

_Children = tuple[Counter, Counter, Histogram]
_Key = tuple[str, str, str, str, str, str, str, str, str, int, str, str]


class RequestMetrics:
    """``meshlib_requests_total``, ``meshlib_request_errors_total``, ``meshlib_request_duration_milliseconds``.

    Both ends report each request (``reporter="source"`` from the client side,
    ``"destination"`` from the server side), as Istio's sidecars do; an error is
    ``RequestRecord.is_error`` (a 5xx or no response).
    """

    def __init__(self, registry: CollectorRegistry, *, max_children: int = MAX_CHILDREN) -> None:
        self.requests = Counter(
            "meshlib_requests_total", "Requests, as each end saw them.", REQUEST_LABELS, registry=registry
        )
        self.errors = Counter(
            "meshlib_request_errors_total",
            "Requests that ended in a 5xx or with no response.",
            REQUEST_LABELS,
            registry=registry,
        )
        self.duration = Histogram(
            "meshlib_request_duration_milliseconds",
            "Request duration in milliseconds, from the first byte sent or received to the end.",
            REQUEST_LABELS,
            buckets=DURATION_BUCKETS_MS,
            registry=registry,
        )
        self.max_children = max_children
        self._children: dict[_Key, _Children] = {}
        self._lock = threading.Lock()
        self._folded = False

    def observe(self, record: RequestRecord) -> None:
        """Count one finished request (hot path: a tuple, a dict lookup, three increments)."""
        key: _Key = (
            record.reporter,
            record.source_workload,
            record.source_namespace,
            record.source_principal,
            record.destination_service,
            record.destination_workload,
            record.destination_namespace,
            record.destination_subset,
            record.request_protocol,
            record.response_code,
            record.response_flags,
            record.connection_security_policy,
        )
        children = self._children.get(key)
        if children is None:
            children = self._child(key)
        requests, errors, duration = children
        requests.inc()
        if record.response_code == 0 or record.response_code >= 500:  # RequestRecord.is_error, inlined
            errors.inc()
        duration.observe(record.duration * 1000.0)

    def _child(self, key: _Key) -> _Children:
        with self._lock:
            children = self._children.get(key)
            if children is not None:
                return children
            if len(self._children) >= self.max_children:
                key = self._fold(key)
                children = self._children.get(key)
                if children is not None:
                    return children
            values = tuple(str(v) for v in key)
            children = (
                self.requests.labels(*values),
                self.errors.labels(*values),
                self.duration.labels(*values),
            )
            self._children[key] = children
            return children

    def _fold(self, key: _Key) -> _Key:
        if not self._folded:
            self._folded = True
            log.warning(
                "meshlib: more than %d label sets on request metrics; new ones are counted with their source and "
                "destination labels set to %r (a label is taking unbounded values, which it should not)",
                self.max_children,
                _OTHER,
            )
        values = list(key)
        for i in _FOLDED:
            values[i] = _OTHER
        return tuple(values)  # type: ignore[return-value]  # same shape as the key it came from


# ------------------------------------------------------------------------------ engine state


@dataclass(frozen=True, slots=True)
class EngineState:
    """What ``EngineCollector`` reads at scrape time; ``Mesh`` hands a callable returning it."""

    outbound: Outbound | None
    inbound: Inbound | None
    certificates: WorkloadCertificates | None
    version: str
    workload: str
    namespace: str


_DEST_LABELS = ("source_workload", "source_namespace", "destination_service", "destination_subset")
_BREAKER_STATES = ("closed", "open", "half_open")


class _Cluster:
    """Sums over a (service, subset)'s destinations: one per port, summed so label sets stay unique."""

    __slots__ = (
        "active",
        "breaker_opens",
        "budget_exhausted",
        "ejected",
        "ejections",
        "endpoints",
        "overflows",
        "pending",
        "retries",
        "states",
    )

    def __init__(self) -> None:
        self.retries = self.budget_exhausted = self.ejections = self.overflows = self.breaker_opens = 0
        self.ejected = self.endpoints = self.active = self.pending = 0
        self.states = dict.fromkeys(_BREAKER_STATES, 0)

    def add(self, dest: Destination) -> None:
        counters = dest.counters
        self.retries += counters.retries
        self.budget_exhausted += counters.retry_budget_exhausted
        self.ejections += counters.ejections
        self.overflows += counters.pool_overflows
        outlier = dest.outlier.stats()
        self.ejected += outlier.ejected
        self.endpoints += outlier.endpoints
        breaker = dest.breaker.stats()
        self.breaker_opens += breaker.opens
        state = breaker.state.replace("-", "_")
        self.states[state] = self.states.get(state, 0) + 1
        pool = dest.pool.stats()
        self.active += pool.active
        self.pending += pool.pending


class EngineCollector(Collector):
    """Reads the engines' counters and state when Prometheus scrapes; nothing on the request path.

    Destination metrics are labelled by service and subset (summed over ports).
    ``meshlib_circuit_breaker_state`` is 1 for the state a cluster's breaker is in
    (the number of its ports' breakers in that state, when it has several ports).
    Counters are per cluster and survive snapshot swaps; a cluster dropped from the
    configuration takes its series with it.
    """

    def __init__(self, engine_state: Callable[[], EngineState]) -> None:
        self._engine_state = engine_state

    def describe(self) -> Iterable[Metric]:
        """The families without samples, so registering does not call ``engine_state`` (the mesh may be half-built)."""
        return _Families().all()

    def collect(self) -> Iterable[Metric]:
        state = self._engine_state()
        fam = _Families()
        fam.config.add_metric([state.workload, state.namespace, state.version], 1)
        if state.outbound is not None:
            fam.outbound(state, state.outbound)
            for limiter in list(state.outbound.rate_limiters.values()):
                fam.refused("client", limiter)
        if state.inbound is not None:
            fam.refused("server", state.inbound.limits)
        certs = state.certificates
        if certs is not None:
            identity = str(certs.identity)
            fam.cert_expiry.add_metric([identity], certs.issued.not_after)
            fam.cert_renewals.add_metric([identity], certs.generation - 1)
        return fam.all()


class _Families:
    """One scrape's families (they hold that scrape's samples)."""

    def __init__(self) -> None:
        d = _DEST_LABELS
        self.config = GaugeMetricFamily(
            "meshlib_config_info",
            "The configuration version in force (always 1).",
            labels=["workload", "namespace", "version"],
        )
        self.retries = CounterMetricFamily("meshlib_retries", "Retries decided, per destination.", labels=d)
        self.budget = CounterMetricFamily(
            "meshlib_retry_budget_exhausted", "Retries the retry budget refused (URX).", labels=d
        )
        self.ejections = CounterMetricFamily(
            "meshlib_outlier_ejections", "Endpoints ejected by outlier detection.", labels=d
        )
        self.ejected = GaugeMetricFamily("meshlib_outlier_ejected_endpoints", "Endpoints ejected now.", labels=d)
        self.endpoints = GaugeMetricFamily("meshlib_destination_endpoints", "Endpoints the destination has.", labels=d)
        self.breaker = GaugeMetricFamily(
            "meshlib_circuit_breaker_state", "1 for the state the circuit breaker is in.", labels=[*d, "state"]
        )
        self.opens = CounterMetricFamily("meshlib_circuit_breaker_open", "Times the circuit breaker opened.", labels=d)
        self.overflows = CounterMetricFamily(
            "meshlib_pool_overflow", "Attempts refused by connection-pool limits (UO).", labels=d
        )
        self.active = GaugeMetricFamily("meshlib_pool_active_requests", "Requests holding a pool slot.", labels=d)
        self.pending = GaugeMetricFamily("meshlib_pool_pending_requests", "Requests queued for a pool slot.", labels=d)
        self.rate_limited = CounterMetricFamily(
            "meshlib_rate_limited", "Requests refused by a rate limit (RL).", labels=["side", "policy", "limit"]
        )
        self.cert_expiry = GaugeMetricFamily(
            "meshlib_certificate_expiry_timestamp_seconds",
            "When the workload certificate in force expires (POSIX time).",
            labels=["identity"],
        )
        self.cert_renewals = CounterMetricFamily(
            "meshlib_certificate_renewals", "Workload certificates renewed.", labels=["identity"]
        )

    def all(self) -> list[Metric]:
        return [
            self.config,
            self.retries,
            self.budget,
            self.ejections,
            self.ejected,
            self.endpoints,
            self.breaker,
            self.opens,
            self.overflows,
            self.active,
            self.pending,
            self.rate_limited,
            self.cert_expiry,
            self.cert_renewals,
        ]

    def outbound(self, state: EngineState, outbound: Outbound) -> None:
        clusters: dict[tuple[str, str], _Cluster] = {}
        for dest in list(outbound.destinations.values()):  # a copy: requests may add to it meanwhile
            key = (dest.host, dest.subset or "unknown")
            cluster = clusters.get(key)
            if cluster is None:
                cluster = clusters[key] = _Cluster()
            cluster.add(dest)
        for (service, subset), c in sorted(clusters.items()):
            labels = [state.workload, state.namespace, service, subset]
            self.retries.add_metric(labels, c.retries)
            self.budget.add_metric(labels, c.budget_exhausted)
            self.ejections.add_metric(labels, c.ejections)
            self.ejected.add_metric(labels, c.ejected)
            self.endpoints.add_metric(labels, c.endpoints)
            self.opens.add_metric(labels, c.breaker_opens)
            for name in _BREAKER_STATES:
                self.breaker.add_metric([*labels, name], c.states.get(name, 0))
            self.overflows.add_metric(labels, c.overflows)
            self.active.add_metric(labels, c.active)
            self.pending.add_metric(labels, c.pending)

    def refused(self, side: str, limiter: RateLimiterEngine) -> None:
        for (policy, limit), count in sorted(dict(limiter.refused).items()):
            self.rate_limited.add_metric([side, policy, limit], count)
