"""The resource kinds meshlib reads, and the kinds it knows but ignores.

One class per kind binds the envelope to its spec model and the apiVersions Istio
serves it under. ``KINDS`` is what the loader dispatches on.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from ._meshkinds import MeshConfigSpec, RateLimitPolicySpec
from ._networking import DestinationRuleSpec, ServiceEntrySpec, VirtualServiceSpec
from ._resource import Resource
from ._security import AuthorizationPolicySpec, PeerAuthenticationSpec

__all__ = [
    "IGNORED_KINDS",
    "KINDS",
    "AuthorizationPolicy",
    "DestinationRule",
    "MeshConfig",
    "PeerAuthentication",
    "RateLimitPolicy",
    "ServiceEntry",
    "VirtualService",
]

_NETWORKING = ("v1alpha3", "v1beta1", "v1")
_SECURITY = ("v1beta1", "v1")
_MESHLIB = ("v1alpha1",)


class _Kind(Resource):
    @model_validator(mode="before")
    @classmethod
    def _empty_spec(cls, data: Any) -> Any:
        # A resource with no spec is an empty spec in Kubernetes (``spec: {}``); the
        # spec model then says whether empty is valid for the kind.
        if isinstance(data, dict) and data.get("spec") is None:
            data = {**data, "spec": {}}
        return data


class VirtualService(_Kind):
    """Routes for one or more hosts."""

    KIND = "VirtualService"
    GROUP = "networking.istio.io"
    VERSIONS = _NETWORKING
    spec: VirtualServiceSpec = Field()


class DestinationRule(_Kind):
    """Subsets and traffic policy of one host."""

    KIND = "DestinationRule"
    GROUP = "networking.istio.io"
    VERSIONS = _NETWORKING
    spec: DestinationRuleSpec = Field()


class ServiceEntry(_Kind):
    """A service in the registry: hosts, ports, endpoints."""

    KIND = "ServiceEntry"
    GROUP = "networking.istio.io"
    VERSIONS = _NETWORKING
    spec: ServiceEntrySpec = Field()


class PeerAuthentication(_Kind):
    """Which mTLS mode a workload's server side accepts."""

    KIND = "PeerAuthentication"
    GROUP = "security.istio.io"
    VERSIONS = _SECURITY
    spec: PeerAuthenticationSpec = Field()


class AuthorizationPolicy(_Kind):
    """Who may call what on a workload."""

    KIND = "AuthorizationPolicy"
    GROUP = "security.istio.io"
    VERSIONS = _SECURITY
    spec: AuthorizationPolicySpec = Field()


class MeshConfig(_Kind):
    """Mesh-wide defaults; at most one per mesh."""

    KIND = "MeshConfig"
    GROUP = "meshlib.io"
    VERSIONS = _MESHLIB
    spec: MeshConfigSpec = Field()


class RateLimitPolicy(_Kind):
    """Local or global request limits, on the client or the server side."""

    KIND = "RateLimitPolicy"
    GROUP = "meshlib.io"
    VERSIONS = _MESHLIB
    spec: RateLimitPolicySpec = Field()


KINDS: dict[str, type[Resource]] = {
    cls.KIND: cls
    for cls in (
        ServiceEntry,
        VirtualService,
        DestinationRule,
        PeerAuthentication,
        AuthorizationPolicy,
        MeshConfig,
        RateLimitPolicy,
    )
}

#: Istio kinds that are valid but that meshlib does not implement: loading them is a
#: warning naming the kind, never an error and never silent.
IGNORED_KINDS: dict[str, str] = {
    "Gateway": "meshlib has no ingress/egress gateways",
    "Sidecar": "meshlib data planes see the configuration the control plane scopes for them",
    "EnvoyFilter": "meshlib is not Envoy",
    "WorkloadEntry": "register workloads with the control plane, or list endpoints in a ServiceEntry",
    "WorkloadGroup": "register workloads with the control plane",
    "ProxyConfig": "meshlib data planes take their settings from MeshConfig",
    "Telemetry": "meshlib telemetry is configured in MeshConfig",
    "RequestAuthentication": "JWT validation needs a JWT hook on the server side",
    "WasmPlugin": "meshlib is not Envoy",
}
