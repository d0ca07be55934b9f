"""The immutable Snapshot: one configuration, checked, hashed and indexed for the hot path.

Everything a request needs to look up (routes of a host, the rule and subsets of a
host, endpoints of a subset, the policies of a workload) is computed once here, so
engines do dictionary lookups per request, never scans over resources.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any, Literal

from .._exceptions import Issue, PolicyError
from ._checks import check_set
from ._hosts import canonical_host
from ._identity import Workload
from ._kinds import (
    AuthorizationPolicy,
    DestinationRule,
    MeshConfig,
    PeerAuthentication,
    RateLimitPolicy,
    ServiceEntry,
    VirtualService,
)
from ._load import Loaded, Origin, parse_documents, read_documents
from ._meshkinds import MeshConfigSpec
from ._networking import TrafficPolicy
from ._resource import Resource

__all__ = ["Endpoint", "MtlsPolicy", "Service", "ServicePort", "Snapshot", "SubsetView"]

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ServicePort:
    """A port a service listens on."""

    number: int
    name: str = ""
    protocol: str = ""
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance of a service: where it is and what it is labelled."""

    address: str
    ports: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    weight: int = 1
    service_account: str = ""

    def port_for(self, port: ServicePort) -> int:
        """The endpoint's port for a service port: by name, else targetPort, else the same number."""
        if port.name and port.name in self.ports:
            return self.ports[port.name]
        return port.target_port or port.number


@dataclass(frozen=True, slots=True)
class Service:
    """A host of the registry (from a ServiceEntry in static mode)."""

    host: str
    namespace: str
    ports: tuple[ServicePort, ...]
    endpoints: tuple[Endpoint, ...]
    location: str = "MESH_INTERNAL"
    resolution: str = "NONE"
    source: str = ""
    subject_alt_names: tuple[str, ...] = ()
    """Identities the endpoints' certificates may carry (mTLS checks them)."""


@dataclass(frozen=True, slots=True)
class SubsetView:
    """A subset of a host: its labels, merged traffic policy and matching endpoints."""

    host: str
    name: str
    labels: Mapping[str, str]
    traffic_policy: TrafficPolicy | None
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class MtlsPolicy:
    """The effective PeerAuthentication of a workload: a mode, and per-port overrides."""

    mode: Literal["DISABLE", "PERMISSIVE", "STRICT"]
    ports: Mapping[int, str]
    sources: tuple[str, ...] = ()

    def mode_for(self, port: int | None) -> str:
        return self.ports.get(port, self.mode) if port is not None else self.mode


class Snapshot:
    """One immutable, checked configuration with a content-hash ``version``.

    Build it with :meth:`from_files`, :meth:`from_resources` or :meth:`build`; a bad
    configuration raises :class:`~meshlib.PolicyError` listing every issue, and a
    snapshot that exists is always consistent.
    """

    def __init__(self, items: Sequence[tuple[Resource, Origin]], warnings: Sequence[Issue] = ()) -> None:
        self._resources: tuple[Resource, ...] = tuple(sorted((r for r, _ in items), key=lambda r: r.ref))
        self._origins: Mapping[str, Origin] = MappingProxyType({r.ref: o for r, o in items})
        self._by_ref: Mapping[str, Resource] = MappingProxyType({r.ref: r for r in self._resources})
        self.warnings: tuple[Issue, ...] = tuple(warnings)
        digest = hashlib.sha256(
            json.dumps([r.to_document() for r in self._resources], sort_keys=True, separators=(",", ":")).encode()
        )
        self.version: str = digest.hexdigest()[:16]
        configs = [r for r in self._resources if isinstance(r, MeshConfig)]
        self.mesh_config: MeshConfigSpec = configs[0].spec if configs else MeshConfigSpec()
        self._services = self._index_services()
        self._virtual_services: Mapping[str, VirtualService] = self._index_by_host(VirtualService)
        self._rules: Mapping[str, DestinationRule] = self._index_by_host(DestinationRule)
        self._subsets = self._index_subsets()

    # -- construction -------------------------------------------------------------

    @classmethod
    def build(cls, loaded: Loaded) -> Snapshot:
        """Check a loaded configuration as one mesh; raise on any error, keep warnings."""
        issues = list(loaded.issues) + check_set(loaded.resources, cross_file="error")
        errors = [i for i in issues if i.severity == "error"]
        if errors:
            raise PolicyError(errors)
        return cls(loaded.resources, [i for i in issues if i.severity == "warning"])

    @classmethod
    def from_files(cls, *paths: str | os.PathLike[str]) -> Snapshot:
        """Files or folders of YAML (multi-document files too), as one configuration."""
        docs, issues = read_documents(paths)
        loaded = parse_documents(docs)
        return cls.build(Loaded(loaded.resources, tuple(issues) + loaded.issues))

    @classmethod
    def from_resources(cls, documents: Iterable[Mapping[str, Any] | Resource]) -> Snapshot:
        """Parsed documents (dicts as YAML would give) or resource models."""
        docs = [(doc, Origin("<resources>", i)) for i, doc in enumerate(documents)]
        return cls.build(parse_documents(docs))

    @classmethod
    def empty(cls) -> Snapshot:
        return cls(())

    # -- the resources ------------------------------------------------------------

    @property
    def resources(self) -> tuple[Resource, ...]:
        return self._resources

    def get(self, ref: str) -> Resource | None:
        """A resource by ``kind/namespace/name``."""
        return self._by_ref.get(ref)

    def origin(self, ref: str) -> Origin | None:
        return self._origins.get(ref)

    def of_kind(self, kind: type[Resource]) -> tuple[Any, ...]:
        return tuple(r for r in self._resources if isinstance(r, kind))

    def __repr__(self) -> str:
        return f"<Snapshot version={self.version} resources={len(self._resources)}>"

    # -- hosts --------------------------------------------------------------------

    def canonical(self, host: str, namespace: str = "default") -> str:
        return canonical_host(host, namespace)

    @property
    def services(self) -> Mapping[str, Service]:
        return self._services

    def service(self, host: str, namespace: str = "default") -> Service | None:
        return self._services.get(canonical_host(host, namespace))

    def virtual_service(self, host: str, namespace: str = "default") -> VirtualService | None:
        """The VirtualService bound to a host (None: the host's default route)."""
        return self._virtual_services.get(canonical_host(host, namespace))

    def destination_rule(self, host: str, namespace: str = "default") -> DestinationRule | None:
        """The rule for a host: an exact host first, else the most specific wildcard."""
        fqdn = canonical_host(host, namespace)
        rule = self._rules.get(fqdn)
        if rule is not None:
            return rule
        wild = [p for p in self._rules if p.startswith("*") and (p == "*" or fqdn.endswith(p[1:]))]
        return self._rules[max(wild, key=len)] if wild else None

    def subset(self, host: str, name: str | None, namespace: str = "default") -> SubsetView:
        """A subset of a host (``name=None``: the whole host) with its merged policy and endpoints."""
        fqdn = canonical_host(host, namespace)
        view = self._subsets.get((fqdn, name))
        if view is not None:
            return view
        rule = self.destination_rule(fqdn)
        base = rule.spec.traffic_policy if rule is not None else None
        service = self._services.get(fqdn)
        endpoints = service.endpoints if service is not None else ()
        if name is None:
            return SubsetView(fqdn, "", _EMPTY, base, endpoints)
        subset = next((s for s in (rule.spec.subsets or ()) if s.name == name), None) if rule else None
        if subset is None:
            raise PolicyError(f"host {fqdn} has no subset {name!r}")
        return _make_subset(fqdn, subset.name, subset.labels or {}, base, subset.traffic_policy, endpoints)

    # -- per-workload policies ----------------------------------------------------

    def _applies(self, resource: Resource, selector: Any, workload: Workload) -> bool:
        root = self.mesh_config.root_namespace
        if resource.namespace not in (workload.namespace, root):
            return False
        if selector is None:
            return True
        # A selector in the root namespace selects across the mesh, as in Istio.
        return bool(selector.matches(workload.all_labels))

    def scoped_to(self, workload: Workload) -> tuple[Resource, ...]:
        """What one workload's data plane needs: every host (visibility is mesh-wide), its own inbound policies.

        The control plane pushes this much and no more, so a workload never learns the
        authorization or rate-limit rules of another; a Snapshot built from it makes the same
        decisions for this workload as the whole configuration does.
        """
        peer_auth = set(self._peer_authentications(workload))
        keep: list[Resource] = []
        for r in self._resources:
            if isinstance(r, PeerAuthentication):
                if r.ref in peer_auth:
                    keep.append(r)
            elif isinstance(r, AuthorizationPolicy | RateLimitPolicy):
                if self._applies(r, r.spec.selector, workload):
                    keep.append(r)
            else:
                keep.append(r)
        return tuple(keep)

    def _peer_authentications(self, workload: Workload) -> list[str]:
        root = self.mesh_config.root_namespace
        refs = []
        for r in self.of_kind(PeerAuthentication):
            if r.spec.selector is None:
                if r.namespace in (root, workload.namespace):
                    refs.append(r.ref)
            elif r.namespace == workload.namespace and r.spec.selector.matches(workload.all_labels):
                refs.append(r.ref)
        return refs

    def authorization_policies(self, workload: Workload) -> tuple[AuthorizationPolicy, ...]:
        """The AuthorizationPolicies that apply to a workload, in name order."""
        return tuple(r for r in self.of_kind(AuthorizationPolicy) if self._applies(r, r.spec.selector, workload))

    def rate_limits(
        self, workload: Workload, side: Literal["SERVER", "CLIENT"] = "SERVER"
    ) -> tuple[RateLimitPolicy, ...]:
        """RateLimitPolicies this workload enforces on the given side."""
        return tuple(
            r
            for r in self.of_kind(RateLimitPolicy)
            if r.spec.side == side and self._applies(r, r.spec.selector, workload)
        )

    def mtls(self, workload: Workload) -> MtlsPolicy:
        """The workload's effective PeerAuthentication (workload > namespace > mesh; UNSET inherits)."""
        root = self.mesh_config.root_namespace
        mesh_wide: PeerAuthentication | None = None
        namespace_wide: PeerAuthentication | None = None
        specific: PeerAuthentication | None = None
        for r in self.of_kind(PeerAuthentication):
            if r.spec.selector is None:
                if r.namespace == workload.namespace and workload.namespace != root:
                    namespace_wide = r
                elif r.namespace == root:
                    mesh_wide = r
            elif (
                specific is None  # Istio picks the oldest; meshlib, the first by name
                and r.namespace == workload.namespace
                and r.spec.selector.matches(workload.all_labels)
            ):
                specific = r
        mode = "PERMISSIVE"
        sources: list[str] = []
        for level in (mesh_wide, namespace_wide, specific):
            if level is None:
                continue
            level_mode = level.spec.mtls.mode if level.spec.mtls is not None else "UNSET"
            if level_mode != "UNSET":
                mode = level_mode
                sources.append(level.ref)
        ports: dict[int, str] = {}
        if specific is not None:
            for port, setting in (specific.spec.port_level_mtls or {}).items():
                ports[int(port)] = mode if setting.mode == "UNSET" else setting.mode
        return MtlsPolicy(mode, MappingProxyType(ports), tuple(sources))  # type: ignore[arg-type]

    # -- indexes ------------------------------------------------------------------

    def _index_services(self) -> Mapping[str, Service]:
        out: dict[str, Service] = {}
        for r in self.of_kind(ServiceEntry):
            spec = r.spec
            ports = tuple(
                ServicePort(p.number, p.name or "", p.protocol or "", getattr(p, "target_port", None))
                for p in spec.ports or ()
            )
            endpoints = tuple(
                Endpoint(
                    address=e.address,
                    ports=MappingProxyType(dict(e.ports or {})),
                    labels=MappingProxyType(dict(e.labels or {})),
                    weight=e.weight or 1,
                    service_account=e.service_account or "",
                )
                for e in spec.endpoints or ()
            )
            for host in spec.hosts:
                fqdn = canonical_host(host, r.namespace)
                out[fqdn] = Service(
                    fqdn,
                    r.namespace,
                    ports,
                    endpoints,
                    spec.location or "MESH_INTERNAL",
                    spec.resolution,
                    r.ref,
                    tuple(spec.subject_alt_names or ()),
                )
        return MappingProxyType(out)

    def _index_by_host(self, kind: type[Any]) -> Mapping[str, Any]:
        out: dict[str, Any] = {}
        for r in self.of_kind(kind):
            hosts = r.spec.hosts if isinstance(r, VirtualService) else [r.spec.host]
            for host in hosts:
                out[canonical_host(host, r.namespace)] = r
        return MappingProxyType(out)

    def _index_subsets(self) -> Mapping[tuple[str, str | None], SubsetView]:
        out: dict[tuple[str, str | None], SubsetView] = {}
        for host, service in self._services.items():
            rule = self.destination_rule(host)
            base = rule.spec.traffic_policy if rule is not None else None
            out[(host, None)] = SubsetView(host, "", _EMPTY, base, service.endpoints)
            for s in (rule.spec.subsets or ()) if rule is not None else ():
                out[(host, s.name)] = _make_subset(
                    host, s.name, s.labels or {}, base, s.traffic_policy, service.endpoints
                )
        return MappingProxyType(out)

    @cached_property
    def hosts(self) -> frozenset[str]:
        """Every host the configuration knows of (registry, routes, rules)."""
        return (
            frozenset(self._services)
            | frozenset(self._virtual_services)
            | frozenset(h for h in self._rules if not h.startswith("*"))
        )


def _make_subset(
    host: str,
    name: str,
    labels: Mapping[str, str],
    base: TrafficPolicy | None,
    override: TrafficPolicy | None,
    endpoints: Sequence[Endpoint],
) -> SubsetView:
    policy = override if base is None else base.merged_with(override)
    chosen = tuple(e for e in endpoints if all(e.labels.get(k) == v for k, v in labels.items()))
    return SubsetView(host, name, MappingProxyType(dict(labels)), policy, chosen)
