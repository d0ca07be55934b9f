"""One finished request as one end of it saw it: what metrics, access logs and spans share.

Adapters (the client transports, the middleware, later the sidecar) fill one
``RequestRecord`` per logical request and hand it to ``Telemetry.record``; the
sinks never look at httpx or ASGI objects, so every adapter reports the same
fields the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Reporter", "RequestRecord"]

Reporter = Literal["source", "destination"]


@dataclass(slots=True)
class RequestRecord:
    """Istio's standard labels for one request, plus what an access log line needs.

    Label values are bounded by construction: services, workloads, subsets and
    principals come from the mesh's configuration, never from the request, and the
    path is only ever logged, never a label.
    """

    reporter: Reporter
    source_workload: str = "unknown"
    source_namespace: str = "unknown"
    source_principal: str = "unknown"
    destination_service: str = "unknown"
    destination_workload: str = "unknown"
    destination_namespace: str = "unknown"
    destination_subset: str = "unknown"
    destination_principal: str = "unknown"
    request_protocol: str = "http"
    response_code: int = 0
    """0 when no response came (a reset, a refusal before sending)."""
    response_flags: str = "-"
    """Envoy's flags, comma-separated (``UO``, ``UH``, ``URX``, ``RL``, ``UT``, ``DC``, ``UAEX``...), or ``-``."""
    connection_security_policy: Literal["mutual_tls", "none", "unknown"] = "unknown"
    start_time: float = 0.0
    """Wall-clock POSIX time the request began (for logs)."""
    duration: float = 0.0
    """Seconds, on the monotonic clock."""
    method: str = ""
    path: str = ""
    authority: str = ""
    upstream_host: str = ""
    """``address:port`` of the endpoint that answered (client side), or of this server."""
    attempts: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    authz_policy: str = ""
    """The AuthorizationPolicy that decided, when one did (server side)."""
    audit: str = ""
    """The AUDIT policy that matched, if any."""
    trace_id: str = ""
    user_agent: str = ""
    request_id: str = ""

    @property
    def is_error(self) -> bool:
        """An error for RED purposes: a 5xx, or no response at all."""
        return self.response_code == 0 or self.response_code >= 500
