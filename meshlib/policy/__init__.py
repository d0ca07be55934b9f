"""Pure data: the resource models, identities, loading and the immutable Snapshot.

Nothing here does IO beyond reading configuration files, and nothing imports a
higher layer of meshlib.
"""

from ._base import MeshModel, unenforced_fields
from ._hosts import canonical_host, host_matches, split_host_port
from ._identity import DEFAULT_TRUST_DOMAIN, SpiffeId, Workload
from ._kinds import (
    IGNORED_KINDS,
    KINDS,
    AuthorizationPolicy,
    DestinationRule,
    MeshConfig,
    PeerAuthentication,
    RateLimitPolicy,
    ServiceEntry,
    VirtualService,
)
from ._load import Loaded, Origin, parse_documents, read_documents, read_text
from ._resource import ObjectMeta, Resource
from ._snapshot import Endpoint, MtlsPolicy, Service, ServicePort, Snapshot, SubsetView
from ._validate import validate_paths
from ._values import Duration, LabelSelector, Percent, StringMatch, format_duration, parse_duration

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "IGNORED_KINDS",
    "KINDS",
    "AuthorizationPolicy",
    "DestinationRule",
    "Duration",
    "Endpoint",
    "LabelSelector",
    "Loaded",
    "MeshConfig",
    "MeshModel",
    "MtlsPolicy",
    "ObjectMeta",
    "Origin",
    "PeerAuthentication",
    "Percent",
    "RateLimitPolicy",
    "Resource",
    "Service",
    "ServiceEntry",
    "ServicePort",
    "Snapshot",
    "SpiffeId",
    "StringMatch",
    "SubsetView",
    "VirtualService",
    "Workload",
    "canonical_host",
    "format_duration",
    "host_matches",
    "parse_documents",
    "parse_duration",
    "read_documents",
    "read_text",
    "split_host_port",
    "unenforced_fields",
    "validate_paths",
]
