"""The one error tree of meshlib.

Every error meshlib raises is a ``MeshError``. Configuration errors are also
``ValueError`` (they are bad values); request-path errors raised through httpx are
also ``httpx.TransportError`` so that ``except httpx.HTTPError`` keeps working in
code that knew nothing of the mesh.

    MeshError
    ├── PolicyError (ValueError)                 a configuration meshlib refuses
    ├── RequestPathError (httpx.TransportError)  CircuitOpenError, RateLimitedError, NoHealthyUpstreamError,
    │                                            RetriesExhaustedError, DeadlineExceededError, UnknownHostError,
    │                                            NoWorkloadCertificateError (also a SecurityError)
    ├── SecurityError                            CertificateError, CertificateRequestError (both ValueError)
    └── ControlPlaneError                        talking to the control plane: ControlPlaneUnavailableError,
                                                 ControlPlaneAuthError

The module sits outside the layers on purpose: every layer raises these, so they
live below all of them (as httpx keeps its own tree in ``_exceptions.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import httpx

__all__ = [
    "CertificateError",
    "CertificateRequestError",
    "CircuitOpenError",
    "ControlPlaneAuthError",
    "ControlPlaneError",
    "ControlPlaneUnavailableError",
    "DeadlineExceededError",
    "Issue",
    "MeshError",
    "NoWorkloadCertificateError",
    "NoHealthyUpstreamError",
    "PolicyError",
    "RateLimitedError",
    "RequestPathError",
    "RetriesExhaustedError",
    "SecurityError",
    "UnknownHostError",
]


class MeshError(Exception):
    """Root of every error meshlib raises."""


@dataclass(frozen=True, slots=True)
class Issue:
    """One finding about a configuration: where it is and what is wrong.

    ``file`` and ``document`` locate the YAML document (``document`` counts from 0
    within its file), ``resource`` is ``kind/namespace/name`` and ``field`` the dotted
    path inside the resource (``spec.http[0].route[1].weight``). Any of them may be
    empty when the finding is not about one place (a YAML syntax error has no
    resource yet).
    """

    message: str
    file: str = ""
    document: int | None = None
    resource: str = ""
    field: str = ""
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        where: list[str] = []
        if self.file:
            where.append(self.file if self.document is None else f"{self.file}[doc {self.document}]")
        if self.resource:
            where.append(self.resource)
        if self.field:
            where.append(self.field)
        prefix = ": ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class PolicyError(MeshError, ValueError):
    """A configuration that meshlib refuses, with every issue found in it.

    The message names the file, the document, the resource and the field of each
    issue; ``issues`` holds them for programs.
    """

    def __init__(self, issues: Sequence[Issue] | str) -> None:
        if isinstance(issues, str):
            issues = [Issue(issues)]
        self.issues: tuple[Issue, ...] = tuple(issues)
        lines = [str(i) for i in self.issues]
        if len(lines) == 1:
            text = lines[0]
        else:
            text = f"{len(lines)} configuration errors:\n" + "\n".join(f"  - {line}" for line in lines)
        super().__init__(text)


class RequestPathError(MeshError, httpx.TransportError):
    """A request the mesh refused or could not complete.

    ``response_flag`` is Envoy's response flag for the outcome (``UO``, ``UH``...),
    so logs and metrics name it the way mesh users already read it.
    """

    response_flag: str = ""

    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class CircuitOpenError(RequestPathError):
    """The destination's circuit breaker is open, or its connection pool is full."""

    response_flag = "UO"


class RateLimitedError(RequestPathError):
    """A client-side rate limit refused the request before it left.

    ``retry_after`` is how many seconds to wait before the limit lets a request
    through again (0.0 when unknown).
    """

    response_flag = "RL"

    def __init__(self, message: str, *, request: httpx.Request | None = None, retry_after: float = 0.0) -> None:
        super().__init__(message, request=request)
        self.retry_after = retry_after


class NoHealthyUpstreamError(RequestPathError):
    """No endpoint can take the request (none registered, or all ejected)."""

    response_flag = "UH"


class RetriesExhaustedError(RequestPathError):
    """Every allowed attempt failed, or the retry budget ran out."""

    response_flag = "URX"


class DeadlineExceededError(RequestPathError):
    """The request's total deadline (route timeout, or the caller's) ran out.

    ``from_caller`` is True when the deadline that ran out was the one the service's
    own caller sent (propagated by ``MeshMiddleware``), not a shorter route timeout:
    the middleware then answers its caller 504 rather than let the app fail with 500.
    """

    response_flag = "UT"
    from_caller: bool = False


class UnknownHostError(RequestPathError):
    """The host is not in the mesh and MeshConfig says ``outboundTrafficPolicy: REGISTRY_ONLY``."""

    response_flag = "NR"


class SecurityError(MeshError):
    """Workload identity and TLS: the CA, certificates, the peer a connection reached."""


class CertificateError(SecurityError, ValueError):
    """A certificate, key or CA directory that cannot be used (unreadable, expired, wrong kind).

    The message names the file and what is wrong with it, never the key material.
    """


class CertificateRequestError(SecurityError, ValueError):
    """The CA refused to sign a certificate request (wrong identity, extra names, weak key)."""


class NoWorkloadCertificateError(RequestPathError, SecurityError):
    """The destination asks for the mesh's mTLS (ISTIO_MUTUAL) and this workload has no certificate."""

    response_flag = "UF"


class ControlPlaneError(MeshError):
    """The data plane could not get what it needs from the control plane."""


class ControlPlaneUnavailableError(ControlPlaneError):
    """``Mesh.connect`` reached no control plane in time and had no cached configuration to start from.

    The message names the control plane, why the last attempt failed, and where the
    cache was looked for.
    """


class ControlPlaneAuthError(ControlPlaneError):
    """The control plane refused the token (401: unknown, 403: bound to another identity).

    Raised at once, never answered from the cache: a bad token does not heal by
    waiting, and serving stale configuration would hide the mistake.
    """
