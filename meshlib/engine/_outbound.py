"""The client side of a workload: from a request to a plan, the same for every adapter.

``Outbound.plan`` runs the design's client order up to the retry loop — route
match, local answers (no route, redirect, direct response), fault injection, client
rate limit, total deadline — and returns either an answer to give at once or a
``Call`` for the adapter's attempt loop. The async transport, the sync transport
and the sidecar's outbound listener all call it; none decides anything itself.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from .._exceptions import PolicyError, RateLimitedError, UnknownHostError
from ..policy import RateLimitPolicy, Snapshot, VirtualService, Workload, canonical_host
from ..policy._networking import HTTPRoute
from ._balancer import hash_key_for
from ._call import Call
from ._deadline import earliest
from ._destination import Destination, DestinationKey
from ._ratelimit import RateKeyInputs, RateLimiterEngine
from ._retry import RetryPolicy
from ._router import HeaderOps, RequestView, RouteDecision, Router, RouteTarget

__all__ = ["RETRY_NON_IDEMPOTENT_ANNOTATION", "LocalReply", "Outbound", "Passthrough", "Plan", "Proceed"]

RETRY_NON_IDEMPOTENT_ANNOTATION = "meshlib.io/retry-non-idempotent"
"""A VirtualService annotated ``"true"`` lets its routes retry POST and other non-idempotent
methods after the upstream may have seen them (Istio has no field for it)."""


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Not a mesh host: send the request untouched."""


@dataclass(frozen=True, slots=True)
class LocalReply:
    """Answer without sending: no route (404 NR), redirect, direct response, injected abort (FI).

    ``headers`` are final: the route's response header operations are already
    applied. ``delay`` (seconds) is waited before answering: a fault whose delay
    and abort both fired holds the request, then aborts it (as Istio does).
    """

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    flag: str = ""
    decision: RouteDecision | None = None
    delay: float | None = None


@dataclass(slots=True)
class Proceed:
    """Send through ``call``'s attempt loop, after waiting ``delay`` (an injected delay)."""

    call: Call
    decision: RouteDecision
    path: str | None
    """New path (query kept by the adapter), or None for unchanged."""
    authority: str | None
    """New Host, or None for unchanged."""
    request_headers: HeaderOps
    response_headers: HeaderOps
    delay: float | None
    mirrors: tuple[Destination, ...] = field(default=())


Plan = Passthrough | LocalReply | Proceed

_PASSTHROUGH = Passthrough()


class Outbound:
    """A workload's outbound engines for one snapshot; state carries over from ``previous``."""

    def __init__(
        self,
        snapshot: Snapshot,
        workload: Workload | None,
        rng: random.Random,
        previous: Outbound | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.workload = workload
        self.rng = rng
        self.router = Router(snapshot)
        config = snapshot.mesh_config
        self.registry_only = config.outbound_traffic_policy.mode == "REGISTRY_ONLY"
        self.default_timeout = config.default_timeout
        self._default_retry = RetryPolicy.compile(None, config.default_retry)
        propagation = config.deadline_propagation
        self.deadline_header: str | None = propagation.header if propagation.enabled else None
        """Header carrying the remaining deadline to the next hop; ``None``: propagation is off."""
        self._retries: dict[int, tuple[HTTPRoute, RetryPolicy]] = {}
        self._retry_non_idempotent = frozenset(
            vs.ref
            for vs in snapshot.of_kind(VirtualService)
            if vs.metadata.annotations.get(RETRY_NON_IDEMPOTENT_ANNOTATION, "").strip().lower() == "true"
        )
        self._destinations: dict[DestinationKey, Destination] = {}
        self._lock = threading.Lock()
        self._namespace = workload.namespace if workload is not None else "default"
        self._source_labels: Mapping[str, str] = workload.all_labels if workload is not None else {}
        self._limits: dict[str, RateLimiterEngine] = {}
        self._limit_policies: dict[str, tuple[RateLimitPolicy, ...]] = {}
        if workload is not None:
            by_host: dict[str, list[RateLimitPolicy]] = {}
            for policy in snapshot.rate_limits(workload, "CLIENT"):
                host = snapshot.canonical(policy.spec.host or "", policy.namespace)
                by_host.setdefault(host, []).append(policy)
            for host, policies in by_host.items():
                key = tuple(policies)
                self._limit_policies[host] = key
                kept = previous._limits.get(host) if previous is not None else None
                if kept is not None and previous is not None and previous._limit_policies.get(host) == key:
                    self._limits[host] = kept  # same limits: the counters carry on
                else:
                    self._limits[host] = RateLimiterEngine(policies)
        if previous is not None:
            self._carry_over(previous)

    @property
    def version(self) -> str:
        return self.snapshot.version

    # -- engines per destination ----------------------------------------------------

    def _carry_over(self, previous: Outbound) -> None:
        """Rebuild every cluster the previous snapshot had, handing each its state.

        Done now rather than on first use, so state survives any number of swaps
        made while a destination sees no traffic, and never outlives a change.
        """
        hosts = set(self.snapshot.hosts)
        for vs in self.snapshot.of_kind(VirtualService):
            for route in vs.spec.http or ():
                targets = [d.destination for d in route.route] + [d for d, _ in route.mirror_targets]
                hosts.update(canonical_host(d.host, vs.namespace) for d in targets)
        for key, old in list(previous._destinations.items()):  # a copy: requests may add to it meanwhile
            host, subset, port = key
            if host not in hosts:
                continue  # the host left the configuration: so does its state
            try:
                view = self.snapshot.subset(host, subset)
            except PolicyError:
                continue  # the subset is gone
            service = self.snapshot.service(host)
            self._destinations[key] = Destination(view, service, port, self.snapshot.mesh_config, self.rng, old)

    def destination(self, target: RouteTarget, port: int | None = None) -> Destination:
        """The engines of a cluster, built on first use and kept for the snapshot's life.

        ``port`` is the request's port, used when the route's destination names none
        (Istio sends to the service port the request came in on).
        """
        key: DestinationKey = (target.host, target.subset, target.port if target.port is not None else port)
        dest = self._destinations.get(key)
        if dest is not None:
            return dest
        with self._lock:
            dest = self._destinations.get(key)
            if dest is None:
                view = self.snapshot.subset(target.host, target.subset)
                service = self.snapshot.service(target.host)
                dest = Destination(view, service, key[2], self.snapshot.mesh_config, self.rng)
                self._destinations[key] = dest
            return dest

    @property
    def destinations(self) -> Mapping[DestinationKey, Destination]:
        return self._destinations

    @property
    def rate_limiters(self) -> Mapping[str, RateLimiterEngine]:
        """The client rate limits by canonical host (for metrics)."""
        return self._limits

    def retry_policy(self, decision: RouteDecision) -> RetryPolicy:
        route = decision.http_route
        non_idempotent = decision.virtual_service in self._retry_non_idempotent
        if route is None or (decision.retries is None and not non_idempotent):
            return self._default_retry
        cached = self._retries.get(id(route))
        if cached is None:
            policy = RetryPolicy.compile(
                decision.retries, self.snapshot.mesh_config.default_retry, retry_non_idempotent=non_idempotent
            )
            cached = (route, policy)
            self._retries[id(route)] = cached
        return cached[1]

    # -- the plan -------------------------------------------------------------------

    def plan(
        self,
        request: RequestView,
        now: float,
        *,
        replayable: bool = True,
        caller_deadline: float | None = None,
        source_ip: str | None = None,
    ) -> Plan:
        decision = self.router.route(request, self.rng, source_labels=self._source_labels, namespace=self._namespace)
        if decision is None:
            if self.registry_only:
                raise UnknownHostError(
                    f"{request.authority} is not a mesh host and MeshConfig sets outboundTrafficPolicy REGISTRY_ONLY"
                )
            return _PASSTHROUGH
        if decision.no_route:
            return LocalReply(404, b"no route matched", flag="NR", decision=decision)
        if decision.redirect is not None:
            return _local(decision, decision.redirect.status, headers=(("location", decision.redirect.location),))
        if decision.direct_response is not None:
            d = decision.direct_response
            return _local(decision, d.status, d.body)
        if decision.fault_abort is not None:
            return _local(decision, decision.fault_abort, b"fault filter abort", flag="FI", delay=decision.fault_delay)
        target = decision.destination
        assert target is not None  # a routed decision always has one
        limiter = self._limits.get(target.host)
        if limiter is not None:
            verdict = limiter.check(
                RateKeyInputs(
                    method=request.method,
                    path=request.path,
                    headers=request.headers,
                    principal=self.workload.spiffe_id.principal if self.workload else None,
                    namespace=self._namespace,
                )
            )
            if not verdict.allowed:
                why = " (its storage failed and failureMode is CLOSED)" if verdict.storage_failed else ""
                raise RateLimitedError(
                    f"client rate limit {verdict.limit} of {verdict.policy} refused the call to {target.host}{why};"
                    f" retry after {verdict.retry_after:.3f}s",
                    retry_after=verdict.retry_after,
                )
        port = request.port
        dest = self.destination(target, port)
        if decision.fault_injected:
            # Istio applies neither the route's timeout nor its retries to a faulted request.
            retry = RetryPolicy()
            deadline = caller_deadline
        else:
            retry = self.retry_policy(decision)
            timeout = decision.timeout if decision.timeout is not None else self.default_timeout
            deadline = earliest(now + timeout if timeout else None, caller_deadline)
        hash_key = None
        lb = dest.policy.load_balancer if dest.policy is not None else None
        if lb is not None and lb.consistent_hash is not None:
            hash_key = hash_key_for(
                lb.consistent_hash, headers=request.headers, query_params=request.query_params, source_ip=source_ip
            )
        call = Call(
            dest,
            retry,
            method=request.method,
            replayable=replayable,
            deadline=deadline,
            now=now,
            rng=self.rng,
            hash_key=hash_key,
        )
        mirrors = tuple(self.destination(m, port) for m in decision.mirrors)
        return Proceed(
            call,
            decision,
            decision.rewrite_path,
            decision.rewrite_authority,
            decision.request_headers,
            decision.response_headers,
            decision.fault_delay,
            mirrors,
        )


def _local(
    decision: RouteDecision,
    status: int,
    body: bytes = b"",
    *,
    headers: tuple[tuple[str, str], ...] = (),
    flag: str = "",
    delay: float | None = None,
) -> LocalReply:
    """A local answer of a route, with the route's response header operations applied (as Envoy does)."""
    base = (("content-type", "text/plain"), *headers) if body else headers
    ops = decision.response_headers
    final = tuple(ops.apply(base)) if ops else base
    return LocalReply(status, body, final, flag=flag, decision=decision, delay=delay)
