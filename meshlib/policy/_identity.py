"""Workload identities: SPIFFE ids and the ``Workload`` a data plane runs as."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["DEFAULT_TRUST_DOMAIN", "SpiffeId", "Workload"]

DEFAULT_TRUST_DOMAIN = "cluster.local"
_SEGMENT = r"[A-Za-z0-9._\-]+"
_SPIFFE = re.compile(rf"^spiffe://({_SEGMENT})/ns/({_SEGMENT})/sa/({_SEGMENT})\Z")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")


class SpiffeId(str):
    """``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``.

    A ``str`` so it compares equal to the plain URI and goes anywhere a string does;
    the parts are attributes. ``principal`` is the form AuthorizationPolicy uses
    (the id without ``spiffe://``).
    """

    __slots__ = ("namespace", "service_account", "trust_domain")

    trust_domain: str
    namespace: str
    service_account: str

    def __new__(cls, value: str) -> SpiffeId:
        m = _SPIFFE.match(value) if isinstance(value, str) else None
        if m is None:
            raise ValueError(
                f"invalid SPIFFE id {value!r}: expected spiffe://<trust domain>/ns/<namespace>/sa/<service account>"
            )
        self = super().__new__(cls, value)
        self.trust_domain, self.namespace, self.service_account = m.group(1), m.group(2), m.group(3)
        return self

    @classmethod
    def of(cls, namespace: str, service_account: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> SpiffeId:
        return cls(f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")

    @classmethod
    def from_principal(cls, principal: str) -> SpiffeId:
        """Parse Istio's principal form ``cluster.local/ns/N/sa/S``."""
        return cls(principal if principal.startswith("spiffe://") else f"spiffe://{principal}")

    @property
    def principal(self) -> str:
        return self[len("spiffe://") :]


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _DNS_LABEL.match(value) or len(value) > 63:
        raise ValueError(f"invalid {what} {value!r}: use lower-case letters, digits and '-' (a DNS label)")
    return value


@dataclass(frozen=True)
class Workload:
    """Who a data plane runs as: its name, namespace, labels and identity.

    ``service_account`` defaults to the name, as one service account per workload
    is the common Kubernetes practice.
    """

    name: str
    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    service_account: str = ""
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    def __post_init__(self) -> None:
        _check_name("workload name", self.name)
        _check_name("namespace", self.namespace)
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))
        if not self.service_account:
            object.__setattr__(self, "service_account", self.name)
        _check_name("service account", self.service_account)

    def __hash__(self) -> int:
        return hash(
            (self.name, self.namespace, tuple(sorted(self.labels.items())), self.service_account, self.trust_domain)
        )

    @classmethod
    def coerce(cls, value: Workload | str) -> Workload:
        """``workload=`` takes a ``Workload`` or a plain name (namespace default, no labels)."""
        return value if isinstance(value, Workload) else cls(value)

    @property
    def spiffe_id(self) -> SpiffeId:
        return SpiffeId.of(self.namespace, self.service_account, self.trust_domain)

    @property
    def all_labels(self) -> dict[str, str]:
        """The labels a selector sees; ``app`` defaults to the name, as in Kubernetes charts."""
        merged = {"app": self.name}
        merged.update(self.labels)
        return merged
