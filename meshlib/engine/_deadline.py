"""Deadlines that cross hops.

A request's deadline is absolute on the local monotonic clock; on the wire it
travels as the *remaining* milliseconds (like gRPC's ``grpc-timeout``), so clocks
of two machines never need to agree. The server side turns the header back into
a local deadline and the client side of the same service sends what is left of it
on every call it makes while serving, so the whole chain gives up together instead
of each hop waiting out its own timeout.
"""

from __future__ import annotations

from contextvars import ContextVar

__all__ = ["DEFAULT_HEADER", "current_deadline", "earliest", "from_header", "to_header"]

DEFAULT_HEADER = "x-meshlib-deadline"

current_deadline: ContextVar[float | None] = ContextVar("meshlib_deadline", default=None)
"""The deadline of the request being served (set by the server side), on the monotonic clock."""


def earliest(*deadlines: float | None) -> float | None:
    """The earliest of some deadlines; ``None`` means no deadline."""
    set_ = [d for d in deadlines if d is not None]
    return min(set_) if set_ else None


def to_header(deadline: float, now: float) -> str:
    """The remaining time in whole milliseconds (at least 1, so "no time left" is not "no deadline")."""
    return str(max(1, int((deadline - now) * 1000)))


def from_header(value: str | None, now: float) -> float | None:
    """A local deadline from the header; a malformed value is ignored (it is the caller's hint)."""
    if not value:
        return None
    text = value.strip()
    if not text.isdigit() or len(text) > 12:
        return None
    return now + int(text) / 1000.0
