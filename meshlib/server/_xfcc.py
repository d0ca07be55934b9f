"""Envoy's ``x-forwarded-client-cert`` header: the identity a sidecar saw on its mTLS connection.

``By=<our uri>;Hash=<sha256>;URI=<peer spiffe id>``, one element per proxy,
comma-separated, values optionally double-quoted. Only the element the nearest
proxy appended (the last one) speaks for the connection that proxy accepted.
"""

from __future__ import annotations

from ..policy import SpiffeId

__all__ = ["HEADER", "peer_from_xfcc"]

HEADER = b"x-forwarded-client-cert"


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def peer_from_xfcc(value: str) -> SpiffeId | None:
    """The SPIFFE id in the last element's ``URI=`` (None when absent or not a workload id)."""
    elements = [e for e in _split(value, ",") if e.strip()]
    if not elements:
        return None
    for pair in _split(elements[-1], ";"):
        key, sep, field = pair.strip().partition("=")
        if sep and key.strip().lower() == "uri":
            try:
                return SpiffeId(field.strip())
            except ValueError:
                return None
    return None
