"""Host names as Istio resolves them.

A short name is relative to the namespace of the resource that writes it, so
``reviews`` in namespace ``default`` and ``reviews.default.svc.cluster.local`` are
the same service. Every index of the snapshot is keyed by the full name.
"""

from __future__ import annotations

__all__ = ["CLUSTER_DOMAIN", "canonical_host", "host_matches", "split_host_port"]

CLUSTER_DOMAIN = "cluster.local"


def canonical_host(host: str, namespace: str = "default", domain: str = CLUSTER_DOMAIN) -> str:
    """``reviews`` → ``reviews.<namespace>.svc.cluster.local``; full and wildcard names stay."""
    name = host.strip().lower().rstrip(".")
    if not name or name.startswith("*"):
        return name
    if "." not in name:
        return f"{name}.{namespace}.svc.{domain}"
    if name.endswith(".svc"):
        return f"{name}.{domain}"
    return name


def host_matches(pattern: str, host: str) -> bool:
    """Whether a (possibly wildcard) host pattern covers ``host``: ``*.local`` covers ``a.b.local``."""
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return host.endswith(pattern[1:])
    return pattern == host


def split_host_port(authority: str) -> tuple[str, int | None]:
    """``reviews:9080`` → (``reviews``, 9080); IPv6 literals keep their brackets out."""
    if authority.startswith("["):
        end = authority.find("]")
        host = authority[1:end] if end > 0 else authority
        rest = authority[end + 1 :] if end > 0 else ""
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
        return host, port
    host, sep, port_text = authority.rpartition(":")
    if sep and port_text.isdigit() and host:
        return host, int(port_text)
    return authority, None
