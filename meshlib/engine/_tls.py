"""Which TLS an attempt speaks to an endpoint, and whom the endpoint must prove to be.

Istio's rule, decided once per endpoint per snapshot: a DestinationRule ``tls``
setting wins (DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL); without one, *auto mTLS*
sends the mesh's mutual TLS to endpoints labelled ``security.istio.io/tlsMode:
istio`` (the label Istio puts on every workload with a proxy) and plaintext to the
rest. For ISTIO_MUTUAL the server's certificate must carry a SPIFFE id the
destination may run as, in this order: the DestinationRule's ``subjectAltNames``;
the endpoint's ``serviceAccount``; the ServiceEntry's ``subjectAltNames``; else the
service's own name as service account in its namespace (meshlib's convention: a
workload runs as a service account named after it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..policy import Endpoint, Service, SpiffeId
from ..policy._hosts import canonical_host
from ..policy._networking import ClientTLSSettings

__all__ = ["TLS_MODE_LABEL", "TlsOrigination", "origination_for"]

TLS_MODE_LABEL = "security.istio.io/tlsMode"
"""Istio's endpoint label: ``istio`` means the endpoint speaks the mesh's mTLS."""

_CLUSTER_SUFFIX = ".svc.cluster.local"


@dataclass(frozen=True, slots=True)
class TlsOrigination:
    """How one endpoint is reached over TLS (hashable: adapters cache a context per value)."""

    mode: Literal["SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]
    peer_ids: frozenset[str] = frozenset()
    """ISTIO_MUTUAL: URI SANs the server may present (empty: any id in the trust domain).
    SIMPLE / MUTUAL: extra names checked besides the host name (``subjectAltNames``)."""
    trust_domain: str = "cluster.local"
    sni: str | None = None
    ca_certificates: str | None = None
    client_certificate: str | None = None
    private_key: str | None = None
    insecure_skip_verify: bool = False
    auto: bool = False
    """Chosen by auto mTLS (no DestinationRule ``tls``), not by a DestinationRule."""


def origination_for(
    tls: ClientTLSSettings | None, service: Service | None, endpoint: Endpoint | None, host: str, trust_domain: str
) -> TlsOrigination | None:
    """The TLS for ``endpoint`` of ``service`` (None: plaintext)."""
    if tls is None:
        if endpoint is None or endpoint.labels.get(TLS_MODE_LABEL) != "istio":
            return None
        return TlsOrigination(
            "ISTIO_MUTUAL", _expected_ids((), service, endpoint, host, trust_domain), trust_domain, auto=True
        )
    if tls.mode == "DISABLE":
        return None
    if tls.mode == "ISTIO_MUTUAL":
        return TlsOrigination(
            "ISTIO_MUTUAL",
            _expected_ids(tls.subject_alt_names, service, endpoint, host, trust_domain),
            trust_domain,
            sni=tls.sni,
        )
    return TlsOrigination(
        tls.mode,
        frozenset(tls.subject_alt_names),
        trust_domain,
        sni=tls.sni,
        ca_certificates=tls.ca_certificates,
        client_certificate=tls.client_certificate,
        private_key=tls.private_key,
        insecure_skip_verify=bool(tls.insecure_skip_verify),
    )


def _expected_ids(
    names: list[str] | tuple[str, ...],
    service: Service | None,
    endpoint: Endpoint | None,
    host: str,
    trust_domain: str,
) -> frozenset[str]:
    if names:
        return frozenset(names)
    namespace = service.namespace if service is not None else _namespace_of(host)
    if endpoint is not None and endpoint.service_account:
        account = endpoint.service_account
        if account.startswith("spiffe://"):
            return frozenset([account])
        return frozenset([SpiffeId.of(namespace or "default", account, trust_domain)])
    if service is not None and service.subject_alt_names:
        return frozenset(service.subject_alt_names)
    canonical = canonical_host(host, namespace or "default")
    if canonical.endswith(_CLUSTER_SUFFIX):
        name, _, ns = canonical[: -len(_CLUSTER_SUFFIX)].partition(".")
        if name and ns:
            return frozenset([SpiffeId.of(ns, name, trust_domain)])
    return frozenset()  # not a cluster-local name: any identity of the trust domain


def _namespace_of(host: str) -> str | None:
    if host.endswith(_CLUSTER_SUFFIX):
        parts = host[: -len(_CLUSTER_SUFFIX)].split(".")
        if len(parts) == 2:
            return parts[1]
    return None
