"""The engines of one destination cluster, and how they survive a snapshot swap.

A destination is what Envoy calls a cluster: a host, a subset and a port, with the
subset's merged traffic policy. It owns the balancer, outlier detector, breaker,
retry budget and pool limits for that cluster. When a new snapshot arrives, a
destination whose policy did not change keeps all of them (breaker state,
ejections, budgets, load), and one whose endpoints changed keeps its state for the
endpoints that remain.
"""

from __future__ import annotations

import random

from ..policy import Endpoint, Service, ServicePort, SubsetView
from ..policy._meshkinds import MeshConfigSpec
from ..policy._networking import TrafficPolicy
from ._balancer import Balancer, make_balancer
from ._breaker import Breaker
from ._budget import RetryBudget
from ._outlier import OutlierDetector
from ._pool import PoolLimits
from ._tls import TlsOrigination, origination_for

__all__ = ["Destination", "DestinationCounters", "DestinationKey"]

DestinationKey = tuple[str, str | None, int | None]
"""(canonical host, subset or None, port or None)."""


class DestinationCounters:
    """Event counts of one cluster, for metrics.

    One object is shared by a cluster's successive ``Destination``s (whatever
    changed in its policy), so the counts survive snapshot swaps and calls still
    running on the old snapshot's destination count in the same place. Plain ints:
    a rare lost increment under thread contention is acceptable for a metric.
    """

    __slots__ = ("ejections", "pool_overflows", "retries", "retry_budget_exhausted")

    def __init__(self) -> None:
        self.retries = 0
        """Retries decided (the verdict said retry)."""
        self.retry_budget_exhausted = 0
        """Retries the retry budget refused."""
        self.ejections = 0
        """Endpoints the outlier detector ejected."""
        self.pool_overflows = 0
        """Attempts the connection pool refused (UO)."""


class Destination:
    """One cluster's engines. Built once per snapshot for each routed-to cluster."""

    __slots__ = (
        "balancer",
        "breaker",
        "budget",
        "budget_spec",
        "close_connections",
        "counters",
        "dns_target",
        "endpoints",
        "host",
        "outlier",
        "policy",
        "pool",
        "port",
        "service",
        "subset",
        "targets",
        "tls",
    )

    def __init__(
        self,
        view: SubsetView,
        service: Service | None,
        port: int | None,
        mesh_config: MeshConfigSpec,
        rng: random.Random,
        previous: Destination | None = None,
    ) -> None:
        self.host = view.host
        self.subset = view.name or None
        self.port = port
        self.service = service
        policy: TrafficPolicy | None = view.traffic_policy
        self.policy = policy
        self.endpoints: tuple[Endpoint, ...] = view.endpoints
        self.counters: DestinationCounters = previous.counters if previous is not None else DestinationCounters()
        pool_http = policy.connection_pool.http if policy is not None and policy.connection_pool else None
        # maxRequestsPerConnection: 1 is Istio's "keep-alive off": every attempt asks the upstream to close.
        # Other limits (2 and up) are not enforced: the HTTP client reuses connections at will.
        self.close_connections = pool_http is not None and pool_http.max_requests_per_connection == 1
        self.budget_spec = mesh_config.retry_budget
        same_policy = (
            previous is not None and previous.policy == policy and previous.budget_spec == mesh_config.retry_budget
        )
        in_flight = previous.balancer.in_flight if previous is not None else None
        if previous is not None and previous.endpoints == self.endpoints and same_policy:
            self.balancer: Balancer = previous.balancer
        else:
            self.balancer = make_balancer(policy.load_balancer if policy else None, self.endpoints, in_flight=in_flight)
        service_port = _service_port(service, port)
        # Where each endpoint is reached: computed once, looked up per attempt.
        self.targets: dict[str, tuple[str, int]] = {
            key: (ep.address, ep.port_for(service_port) if service_port is not None else (port or 80))
            for key, ep in zip(self.balancer.keys, self.endpoints, strict=True)
        }
        # A host the mesh routes but whose endpoints it does not know (no ServiceEntry, or
        # one with ``resolution: DNS`` or ``NONE`` and no endpoints, as Istio reads it):
        # its policy still applies, and the connection goes to the name through DNS.
        self.dns_target: tuple[str, int] | None = None
        if service is None or (not service.endpoints and service.resolution != "STATIC"):
            self.dns_target = (self.host, port or 80)
        # The TLS each endpoint is reached with (None: plaintext), keyed as ``targets``.
        tls_settings = policy.tls if policy is not None else None
        domain = mesh_config.trust_domain
        self.tls: dict[str, TlsOrigination | None] = {
            key: origination_for(tls_settings, service, ep, self.host, domain)
            for key, ep in zip(self.balancer.keys, self.endpoints, strict=True)
        }
        if self.dns_target is not None:
            dns_key = f"{self.dns_target[0]}:{self.dns_target[1]}"
            self.tls[dns_key] = origination_for(tls_settings, service, None, self.host, domain)
        if previous is not None and same_policy:
            self.outlier: OutlierDetector = previous.outlier
            self.outlier.set_endpoints(self.balancer.keys)
            self.breaker: Breaker = previous.breaker
            self.budget: RetryBudget | None = previous.budget
            self.pool: PoolLimits = previous.pool
        else:
            # A changed policy starts its state afresh; the breaker, which no policy configures, carries on.
            self.outlier = OutlierDetector(policy.outlier_detection if policy else None, self.balancer.keys)
            self.breaker = previous.breaker if previous is not None else Breaker(rng=rng)
            self.budget = RetryBudget.from_policy(mesh_config.retry_budget, policy.retry_budget if policy else None)
            self.pool = PoolLimits.from_policy(policy.connection_pool if policy else None)

    @property
    def name(self) -> str:
        """Envoy-style cluster name, for logs and metrics: ``outbound|80|v1|reviews.default.svc.cluster.local``."""
        return f"outbound|{self.port or ''}|{self.subset or ''}|{self.host}"

    def __repr__(self) -> str:
        return f"<Destination {self.name} endpoints={len(self.endpoints)}>"


def _service_port(service: Service | None, port: int | None) -> ServicePort | None:
    if service is None or not service.ports:
        return None
    if port is not None:
        for p in service.ports:
            if p.number == port:
                return p
    return service.ports[0]
