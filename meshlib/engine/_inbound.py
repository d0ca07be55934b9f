"""The server-side engines of one workload for one snapshot.

Built once per snapshot, like ``Outbound``: the compiled authorization policies,
the server rate limits, the PeerAuthentication in force and the path
normalisation. The middleware and the sidecar's inbound side read
``mesh.inbound`` once per request and ask it; neither holds its own copy of a
decision. Rate-limit counters survive a snapshot swap when the workload's server
limits did not change.
"""

from __future__ import annotations

from ..policy import MtlsPolicy, Snapshot, Workload
from ._authz import Authorizer
from ._ratelimit import RateLimiterEngine

__all__ = ["Inbound"]

_ANONYMOUS = Workload("anonymous")


class Inbound:
    """What a workload enforces on the requests it serves, for the snapshot in force."""

    __slots__ = (
        "authorizer",
        "deadline_header",
        "limits",
        "mtls",
        "path_normalization",
        "rate_policies",
        "snapshot",
        "workload",
    )

    def __init__(self, snapshot: Snapshot, workload: Workload | None, previous: Inbound | None = None) -> None:
        self.snapshot = snapshot
        self.workload = workload or _ANONYMOUS
        mesh_config = snapshot.mesh_config
        self.authorizer = Authorizer(snapshot, self.workload)
        self.mtls: MtlsPolicy = snapshot.mtls(self.workload)
        self.path_normalization: str = self.authorizer.normalization
        propagation = mesh_config.deadline_propagation
        self.deadline_header: str | None = propagation.header if propagation.enabled else None
        self.rate_policies = snapshot.rate_limits(self.workload, "SERVER")
        if previous is not None and previous.rate_policies == self.rate_policies:
            self.limits: RateLimiterEngine = previous.limits  # keep the counters
        else:
            self.limits = RateLimiterEngine(self.rate_policies)

    def __repr__(self) -> str:
        return f"<Inbound {self.workload.spiffe_id} version={self.snapshot.version}>"
