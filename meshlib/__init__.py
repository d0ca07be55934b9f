"""meshlib: a service mesh as a Python library.

Policy is written as Istio resources; meshlib reads it, checks it and (as the
engine, adapters, control plane and sidecar land) enforces it for every call a
service makes or serves.
"""

from ._exceptions import (
    CertificateError,
    CertificateRequestError,
    CircuitOpenError,
    ControlPlaneAuthError,
    ControlPlaneError,
    ControlPlaneUnavailableError,
    DeadlineExceededError,
    Issue,
    MeshError,
    NoHealthyUpstreamError,
    NoWorkloadCertificateError,
    PolicyError,
    RateLimitedError,
    RequestPathError,
    RetriesExhaustedError,
    SecurityError,
    UnknownHostError,
)
from .client import AsyncMeshTransport, MeshTransport
from .engine import set_testing
from .mesh import Mesh
from .policy import Snapshot, SpiffeId, Workload, validate_paths
from .security import CertificateAuthority, PeerIdentityError
from .server import MeshMiddleware, MeshServer, PeerInfo, peer_identity, serve
from .telemetry import RequestRecord, Telemetry, Tracing, metrics_app

__version__ = "0.1.0.dev0"

__all__ = [
    "AsyncMeshTransport",
    "CertificateError",
    "CertificateRequestError",
    "CircuitOpenError",
    "ControlPlaneAuthError",
    "ControlPlaneError",
    "ControlPlaneUnavailableError",
    "DeadlineExceededError",
    "Issue",
    "Mesh",
    "MeshError",
    "MeshTransport",
    "NoHealthyUpstreamError",
    "NoWorkloadCertificateError",
    "PeerIdentityError",
    "PeerInfo",
    "MeshServer",
    "MeshMiddleware",
    "CertificateAuthority",
    "peer_identity",
    "serve",
    "PolicyError",
    "RateLimitedError",
    "RequestRecord",
    "Telemetry",
    "Tracing",
    "metrics_app",
    "RequestPathError",
    "RetriesExhaustedError",
    "SecurityError",
    "Snapshot",
    "UnknownHostError",
    "SpiffeId",
    "Workload",
    "__version__",
    "set_testing",
    "validate_paths",
]
