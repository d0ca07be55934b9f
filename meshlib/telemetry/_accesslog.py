"""Access log: one line per finished request at each end, JSON (default) or Envoy's default TEXT format.

JSON keys follow Envoy's / Istio's JSON access log so that existing dashboards and
log pipelines read meshlib's lines unchanged. Every line carries every key (a
stable schema is easier to query than a sparse one): a value the record does not
have is ``null``. "Does not have" means an empty string, a ``start_time`` of 0, or
``"unknown"`` in the fields that are also Istio metric labels (workloads,
namespaces, principals, service, subset, ``connection_security_policy``): it is the
labels' placeholder and would read as a real name in a log. Exceptions, as Istio prints them: ``response_flags``
is ``"-"`` when no flag is set, ``response_code`` is ``0`` when no response came,
and ``audit`` is ``false`` or the name of the AUDIT policy that matched.

``protocol`` is Istio's ``request_protocol`` (``http``, ``grpc``), not the HTTP
version Envoy's ``%PROTOCOL%`` prints: the record does not carry the version.

TEXT is Envoy's default format string, filled from the record; a field the record
cannot know is ``-``, Envoy's convention. Always ``-``: ``RESPONSE_CODE_DETAILS``,
``CONNECTION_TERMINATION_DETAILS``, ``UPSTREAM_TRANSPORT_FAILURE_REASON``,
``RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)``, ``REQ(X-FORWARDED-FOR)``,
``UPSTREAM_CLUSTER``, ``UPSTREAM_LOCAL_ADDRESS``, ``DOWNSTREAM_LOCAL_ADDRESS``,
``DOWNSTREAM_REMOTE_ADDRESS``, ``REQUESTED_SERVER_NAME`` and ``ROUTE_NAME``. TEXT has no
``reporter``: the format is Envoy's, unchanged; use JSON to tell the two ends apart.

Writing never raises into the request path: after the log is open, an I/O error
is logged once (logger ``meshlib.access``, whose records never feed back into this
log) and the lines are counted in ``dropped`` instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time

from .._exceptions import MeshError
from ..policy._meshkinds import AccessLogSettings
from ._record import RequestRecord

__all__ = ["AccessLog", "AccessLogError", "format_json", "format_text"]

log = logging.getLogger("meshlib.access")

_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)
# Every request-derived value is quoted or space-separated in TEXT: escape what would
# break the line (control characters, quotes, backslashes) so one request stays one line.
_UNSAFE = re.compile(r'[\x00-\x1f\x7f"\\]')
_FILE_MODE = 0o644


class AccessLogError(MeshError):
    """The access log file cannot be opened; the message names the path and why."""


# ---------------------------------------------------------------------- formatting

_second_cache: tuple[int, str] = (-1, "")


def _start_time(posix: float) -> str | None:
    """``2024-05-01T12:00:00.123Z``, as Envoy prints ``%START_TIME%``; the date part is cached per second."""
    global _second_cache
    if posix <= 0.0:
        return None
    second = int(posix)
    cached = _second_cache  # one tuple read: safe without a lock
    if cached[0] != second:
        cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        _second_cache = cached
    return f"{cached[1]}.{int((posix - second) * 1000):03d}Z"


def _known(value: str) -> str | None:
    return value if value and value != "unknown" else None


def format_json(record: RequestRecord) -> str:
    """One JSON access-log line for ``record``, without the newline."""
    return _ENCODER.encode(
        {
            "start_time": _start_time(record.start_time),
            "method": record.method or None,
            "path": record.path or None,
            "protocol": record.request_protocol or None,
            "response_code": record.response_code,
            "response_flags": record.response_flags or "-",
            "duration": int(record.duration * 1000),
            "bytes_received": record.bytes_received,
            "bytes_sent": record.bytes_sent,
            "upstream_host": record.upstream_host or None,
            "authority": record.authority or None,
            "user_agent": record.user_agent or None,
            "request_id": record.request_id or None,
            "trace_id": record.trace_id or None,
            "source_principal": _known(record.source_principal),
            "source_workload": _known(record.source_workload),
            "source_namespace": _known(record.source_namespace),
            "destination_service": _known(record.destination_service),
            "destination_workload": _known(record.destination_workload),
            "destination_namespace": _known(record.destination_namespace),
            "destination_principal": _known(record.destination_principal),
            "destination_subset": _known(record.destination_subset),
            "connection_security_policy": _known(record.connection_security_policy),
            "reporter": record.reporter,
            "attempts": record.attempts,
            "authz_policy": record.authz_policy or None,
            "audit": record.audit or False,
        }
    )


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return "\\" + char if char in '"\\' else f"\\x{ord(char):02x}"


def _text(value: str) -> str:
    """A request-derived value for TEXT: ``-`` when empty, escaped when it could break the line."""
    if not value:
        return "-"
    return _UNSAFE.sub(_escape, value) if _UNSAFE.search(value) else value


def format_text(record: RequestRecord) -> str:
    """One line in Envoy's default access-log format for ``record``, without the newline."""
    start = _start_time(record.start_time) or "-"
    return (
        f'[{start}] "{_text(record.method)} {_text(record.path)} {_text(record.request_protocol)}" '
        f"{record.response_code} {_text(record.response_flags)} - - "
        f'"-" {record.bytes_received} {record.bytes_sent} {int(record.duration * 1000)} - '
        f'"-" "{_text(record.user_agent)}" "{_text(record.request_id)}" "{_text(record.authority)}" '
        f'"{_text(record.upstream_host)}" - - - - - -'
    )


# ---------------------------------------------------------------------- the sink


def _open(path: str) -> int:
    """Open ``path`` for appending; a file this creates is 0644 whatever the umask (as Envoy's)."""
    flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    except FileExistsError:
        return os.open(path, flags)
    try:
        os.fchmod(fd, _FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


class AccessLog:
    """Writes access-log lines to standard output or appends them to a file; safe from many threads.

    A line is written whole under a lock (and with ``O_APPEND``, so other processes
    appending to the same file do not interleave with it either).
    """

    def __init__(self, settings: AccessLogSettings) -> None:
        self.settings = settings
        self.dropped = 0
        """Lines lost to I/O errors (or written after ``close``)."""
        self._format = format_text if settings.format == "TEXT" else format_json
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._closed = False
        self._failed = False
        if settings.active and settings.path is not None:
            try:
                self._fd = _open(settings.path)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise AccessLogError(f"cannot open access log {settings.path!r}: {reason}") from exc

    def write(self, record: RequestRecord) -> None:
        """Log one finished request; never raises (the request it describes is already done)."""
        if not self.settings.active:
            return
        try:
            line = self._format(record) + "\n"
        except Exception:  # a malformed record from an adapter must not fail the request either
            with self._lock:
                first = self._count_drop()
            if first:
                log.exception("cannot format an access log line; further failures are only counted in dropped")
            return
        with self._lock:
            if self._closed:
                self.dropped += 1
                return
            try:
                if self._fd is None:
                    stream = sys.stdout  # looked up per line: follows redirection (and pytest's capture)
                    stream.write(line)
                    stream.flush()
                else:
                    data = line.encode()
                    while data:
                        data = data[os.write(self._fd, data) :]
                return
            except (OSError, ValueError) as exc:  # ValueError: standard output closed (at interpreter exit)
                error = exc
                first = self._count_drop()
        # Logged outside the lock: a handler that is slow (or that, misconfigured, writes
        # back into this log) must not stall or deadlock the requests behind this one.
        if first:
            log.error(
                "cannot write the access log to %s; further failed lines are only counted in dropped",
                self.settings.path or "standard output",
                exc_info=error,
            )

    def _count_drop(self) -> bool:
        """Count one lost line (lock held); true the first time, when it is worth a log record."""
        self.dropped += 1
        first, self._failed = not self._failed, True
        return first

    def close(self) -> None:
        """Close the file (if one); later writes are dropped. Idempotent."""
        with self._lock:
            self._closed = True
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> AccessLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
