"""Checks that need more than one resource: duplicates, conflicts, references.

Istio leaves several of these to run time (a route to a missing subset answers 503,
two VirtualServices for one host race on creation time). meshlib refuses them at
load time, because a configuration that means two things means neither.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Literal

from .._exceptions import Issue
from ._hosts import canonical_host
from ._kinds import DestinationRule, MeshConfig, PeerAuthentication, ServiceEntry, VirtualService
from ._load import Origin
from ._resource import Resource

__all__ = ["check_set"]

Severity = Literal["error", "warning"]


def check_set(items: Sequence[tuple[Resource, Origin]], cross_file: Severity = "error") -> list[Issue]:
    """Every cross-resource issue of one configuration.

    ``cross_file="warning"`` is ``meshlib validate``'s default: files checked one by
    one (as ``istioctl validate`` does) report a clash with another file as a warning,
    since they may be alternatives rather than one mesh. A clash inside one file is
    always an error.
    """
    issues: list[Issue] = []
    issues += _clashes(items, cross_file, lambda r: r.ref, "{ref} is defined twice")
    issues += _clashes(
        [(r, o) for r, o in items if isinstance(r, MeshConfig)],
        cross_file,
        lambda r: "MeshConfig",
        "a mesh takes one MeshConfig; {ref} repeats it",
    )
    for kind, label in (
        (VirtualService, "VirtualService"),
        (DestinationRule, "DestinationRule"),
        (ServiceEntry, "ServiceEntry"),
    ):
        unique = list({r.ref: (r, o) for r, o in reversed(items) if isinstance(r, kind)}.values())[::-1]
        for host in _hosts_of_kind(unique, kind):
            issues += _clashes(
                [(r, o) for r, o in unique if host in _hosts(r)],
                cross_file,
                lambda r, h=host: h,
                f"{label}s {{others}} and {{ref}} both bind host {host}",
            )
    issues += _clashes(
        [(r, o) for r, o in items if isinstance(r, PeerAuthentication) and r.spec.selector is None],
        cross_file,
        lambda r: r.namespace,
        "namespace {ns} has two PeerAuthentications without selector ({others} and {ref})",
    )
    issues += _subset_references(items)
    return issues


def _hosts(resource: Resource) -> list[str]:
    ns = resource.namespace
    if isinstance(resource, VirtualService):
        return [canonical_host(h, ns) for h in resource.spec.hosts]
    if isinstance(resource, DestinationRule):
        return [canonical_host(resource.spec.host, ns)]
    if isinstance(resource, ServiceEntry):
        return [canonical_host(h, ns) for h in resource.spec.hosts]
    return []


def _hosts_of_kind(items: Sequence[tuple[Resource, Origin]], kind: type[Resource]) -> list[str]:
    seen: dict[str, int] = defaultdict(int)
    for r, _ in items:
        if isinstance(r, kind):
            for h in set(_hosts(r)):
                seen[h] += 1
    return sorted(h for h, n in seen.items() if n > 1)


def _clashes(
    items: Sequence[tuple[Resource, Origin]],
    cross_file: Severity,
    key: object,
    template: str,
) -> list[Issue]:
    assert callable(key)
    first: dict[object, tuple[Resource, Origin]] = {}
    issues: list[Issue] = []
    for resource, origin in items:
        k = key(resource)
        if k not in first:
            first[k] = (resource, origin)
            continue
        other, other_origin = first[k]
        same_file = other_origin.file == origin.file
        where = f"{other_origin.file}[doc {other_origin.document}]"
        message = template.format(ref=resource.ref, others=other.ref, ns=resource.namespace)
        message += f" (first at {where})"
        severity: Severity = "error" if same_file else cross_file
        if severity == "warning":
            message += "; as one mesh these files conflict"
        issues.append(origin.issue(message, resource.ref, "metadata.name", severity))
    return issues


def _subset_references(items: Sequence[tuple[Resource, Origin]]) -> list[Issue]:
    subsets: dict[str, set[str]] = defaultdict(set)
    has_rule: set[str] = set()
    for r, _ in items:
        if isinstance(r, DestinationRule):
            host = canonical_host(r.spec.host, r.namespace)
            has_rule.add(host)
            subsets[host].update(s.name for s in r.spec.subsets or ())
    issues: list[Issue] = []
    for r, origin in items:
        if not isinstance(r, VirtualService):
            continue
        for i, route in enumerate(r.spec.http or ()):
            targets: list[tuple[str, Any]] = []
            for j, dest in enumerate(route.route or ()):
                targets.append((f"spec.http[{i}].route[{j}].destination.subset", dest.destination))
            if route.mirror is not None:
                targets.append((f"spec.http[{i}].mirror.subset", route.mirror))
            for j, mirror in enumerate(route.mirrors or ()):
                targets.append((f"spec.http[{i}].mirrors[{j}].destination.subset", mirror.destination))
            for field, dest in targets:
                subset = getattr(dest, "subset", None)
                if not subset:
                    continue
                host = canonical_host(getattr(dest, "host", ""), r.namespace)
                known = _subsets_for(host, subsets, has_rule)
                if subset in known:
                    continue
                if known:
                    why = f"its DestinationRule defines {', '.join(sorted(known))}"
                else:
                    why = "no DestinationRule defines subsets for that host"
                issues.append(origin.issue(f"route to undefined subset {subset!r} of {host}: {why}", r.ref, field))
    return issues


def _subsets_for(host: str, subsets: dict[str, set[str]], has_rule: set[str]) -> set[str]:
    if host in has_rule:
        return subsets[host]
    # Istio applies the most specific wildcard rule when no exact one exists.
    wild = sorted((p for p in has_rule if p.startswith("*") and (p == "*" or host.endswith(p[1:]))), key=len)
    return subsets[wild[-1]] if wild else set()
