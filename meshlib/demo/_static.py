"""``meshlib demo --static`` / ``--config PATH``: show a mesh configuration as meshlib understands it.

No traffic and nothing started: it loads the static demo shop (``shop.yaml``, or the
files given) and reports what every service would get: identities, routes and their
shares, subsets and endpoints, mTLS modes, authorization and rate limits. Handy to
check one's own YAML; the live demo (``meshlib demo``) shows the same policy at work.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from .._exceptions import PolicyError
from ..policy import Snapshot, Workload, format_duration

__all__ = ["SHOP_CONFIG", "run_static"]

SHOP_CONFIG = "shop.yaml"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join("  " + r.rstrip() for r in out)


def _section(title: str) -> None:
    print(f"\n== {title}")


def _load(config: str | None) -> Snapshot:
    if config is not None:
        return Snapshot.from_files(config)
    with resources.as_file(resources.files(__package__) / SHOP_CONFIG) as path:
        return Snapshot.from_files(path)


def run_static(config: str | None = None) -> int:
    try:
        snapshot = _load(config)
    except PolicyError as exc:
        print(f"meshlib demo: the configuration is invalid\n{exc}", file=sys.stderr)
        return 1
    source = config or f"the demo shop ({Path(__file__).with_name(SHOP_CONFIG)})"
    print(f"meshlib demo: {len(snapshot.resources)} resources from {source}")
    print(f"snapshot version {snapshot.version}; trust domain {snapshot.mesh_config.trust_domain}")

    _section("Services and endpoints (the registry)")
    rows = []
    for host, svc in sorted(snapshot.services.items()):
        ports = ",".join(str(p.number) for p in svc.ports)
        for ep in svc.endpoints or ():
            labels = ",".join(f"{k}={v}" for k, v in sorted(ep.labels.items()))
            target = ep.port_for(svc.ports[0]) if svc.ports else ""
            rows.append([host, ports, f"{ep.address}:{target}", labels, ep.service_account])
    print(_table(["host", "ports", "endpoint", "labels", "service account"], rows))

    _section("Routes (first match wins; shares are weight / sum of weights)")
    rows = []
    for host in sorted(snapshot.hosts):
        vs = snapshot.virtual_service(host)
        if vs is None:
            continue
        for i, route in enumerate(vs.spec.http or ()):
            weights = route.destination_weights
            total = sum(weights) or 1
            shares = [
                f"{d.destination.subset or 'all'} {100 * w / total:.0f}%"
                for d, w in zip(route.route, weights, strict=True)
            ]
            extras = []
            if route.timeout is not None:
                extras.append(f"timeout {format_duration(route.timeout)}")
            if route.retries is not None:
                extras.append(f"retries {route.retries.attempts}")
            if route.fault is not None:
                if route.fault.delay is not None:
                    extras.append(f"delay {format_duration(route.fault.delay.fixed_delay or 0)}")
                if route.fault.abort is not None:
                    extras.append(f"abort {route.fault.abort.http_status}")
            match = "any request" if not route.match else f"{len(route.match)} match rule(s)"
            rows.append([host, route.name or f"#{i}", match, ", ".join(shares), "; ".join(extras)])
    print(_table(["host", "route", "when", "to", "policy"], rows))

    _section("Subsets (endpoints chosen by labels)")
    rows = []
    for host in sorted(snapshot.services):
        rule = snapshot.destination_rule(host)
        for subset in (rule.spec.subsets or ()) if rule is not None else ():
            view = snapshot.subset(host, subset.name)
            lb = "ROUND_ROBIN"
            policy = view.traffic_policy
            if policy is not None and policy.load_balancer is not None:
                lb = policy.load_balancer.simple or "consistentHash"
            eps = ", ".join(e.address + ":" + str(next(iter(e.ports.values()), "")) for e in view.endpoints)
            rows.append([host, subset.name, lb, eps or "(none)"])
    print(_table(["host", "subset", "balancer", "endpoints"], rows))

    _section("Workloads: identity, inbound mTLS, authorization, rate limits")
    rows = []
    for host, svc in sorted(snapshot.services.items()):
        for ep in svc.endpoints[:1]:
            name = ep.labels.get("app", host.split(".")[0])
            wl = Workload(
                name, namespace=svc.namespace, labels=dict(ep.labels), service_account=ep.service_account or name
            )
            authz = ", ".join(f"{p.spec.action} {p.name}" for p in snapshot.authorization_policies(wl)) or "allow all"
            limits = ", ".join(
                f"{lim.rate} per {lim.key.lower()}" for p in snapshot.rate_limits(wl) for lim in p.spec.limits
            )
            rows.append([str(wl.spiffe_id), snapshot.mtls(wl).mode, authz, limits or "-"])
    print(_table(["identity", "mTLS", "authorization", "rate limits"], rows))

    if snapshot.warnings:
        _section("Accepted but not enforced")
        for w in snapshot.warnings:
            print(f"  - {w}")
    print("\nRun `meshlib demo` (no options) to see a live shop enforce policy like this, with traffic.")
    return 0
