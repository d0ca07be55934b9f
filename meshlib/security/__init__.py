"""CA, workload certificates and their rotation, TLS contexts with SPIFFE peer checks."""

from ._ca import (
    DEFAULT_WORKLOAD_TTL,
    MAX_WORKLOAD_TTL,
    CertificateAuthority,
    IssuedCertificate,
    make_csr,
    new_private_key,
)
from ._contexts import NameCheck, TlsContexts
from ._tls import PeerCheck, PeerIdentityError, client_context, peer_spiffe_id, server_context, uri_sans
from ._workload import Issuer, LocalIssuer, WorkloadCertificates, renewal_at, write_files

__all__ = [
    "DEFAULT_WORKLOAD_TTL",
    "MAX_WORKLOAD_TTL",
    "CertificateAuthority",
    "IssuedCertificate",
    "Issuer",
    "LocalIssuer",
    "NameCheck",
    "PeerCheck",
    "PeerIdentityError",
    "TlsContexts",
    "WorkloadCertificates",
    "client_context",
    "make_csr",
    "new_private_key",
    "peer_spiffe_id",
    "renewal_at",
    "server_context",
    "uri_sans",
    "write_files",
]
