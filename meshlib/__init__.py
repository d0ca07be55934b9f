"""meshlib: a service mesh as a Python library.

Policy is written as Istio resources; meshlib reads it, checks it and (as the
engine, adapters, control plane and sidecar land) enforces it for every call a
service makes or serves.
"""

from ._exceptions import (
    CircuitOpenError,
    DeadlineExceededError,
    Issue,
    MeshError,
    NoHealthyUpstreamError,
    PolicyError,
    RateLimitedError,
    RequestPathError,
    RetriesExhaustedError,
    UnknownHostError,
)
from .client import AsyncMeshTransport, MeshTransport
from .engine import set_testing
from .mesh import Mesh
from .policy import Snapshot, SpiffeId, Workload, validate_paths

__version__ = "0.1.0.dev0"

__all__ = [
    "AsyncMeshTransport",
    "CircuitOpenError",
    "DeadlineExceededError",
    "Issue",
    "Mesh",
    "MeshError",
    "MeshTransport",
    "NoHealthyUpstreamError",
    "PolicyError",
    "RateLimitedError",
    "RequestPathError",
    "RetriesExhaustedError",
    "Snapshot",
    "UnknownHostError",
    "SpiffeId",
    "Workload",
    "__version__",
    "set_testing",
    "validate_paths",
]
