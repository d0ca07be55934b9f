"""One TLS context per way of reaching an endpoint (``TlsOrigination``), built once.

ISTIO_MUTUAL contexts come from the workload's certificate, so they follow its
rotation; SIMPLE and MUTUAL contexts come from the files a DestinationRule names,
read once per snapshot.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from typing import Any

from .._exceptions import CertificateError, NoWorkloadCertificateError
from ..engine import TlsOrigination
from ._tls import ALPN, CheckedSSLObject, CheckedSSLSocket, PeerIdentityError
from ._workload import WorkloadCertificates

__all__ = ["NameCheck", "TlsContexts"]

log = logging.getLogger("meshlib.security")


class NameCheck:
    """DestinationRule ``subjectAltNames`` for SIMPLE / MUTUAL: one SAN of the server must be listed."""

    __slots__ = ("names",)

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def verify(self, cert: dict[str, Any] | None) -> None:
        sans = [value for _, value in (cert or {}).get("subjectAltName", ())]
        if not any(name in self.names for name in sans):
            raise PeerIdentityError(
                f"the server's certificate names {', '.join(sans) or 'nothing'}; "
                f"expected {' or '.join(sorted(self.names))} (subjectAltNames)"
            )


class TlsContexts:
    """Hands the client transports a context for each ``TlsOrigination``."""

    def __init__(self, certificates: WorkloadCertificates | None) -> None:
        self.certificates = certificates
        self._files: dict[TlsOrigination, ssl.SSLContext] = {}
        self._warned = False
        self._lock = threading.Lock()

    def context_for(self, tls: TlsOrigination) -> ssl.SSLContext | None:
        """The context for ``tls``; None means plaintext (auto mTLS when this workload has no certificate)."""
        if tls.mode == "ISTIO_MUTUAL":
            certs = self.certificates
            if certs is None:
                if tls.auto:
                    if not self._warned:
                        self._warned = True
                        log.warning(
                            "meshlib: endpoints are labelled for mTLS but this mesh has no workload certificate "
                            "(pass ca= or connect to a control plane); sending plaintext"
                        )
                    return None
                raise NoWorkloadCertificateError(
                    "the DestinationRule asks for ISTIO_MUTUAL but this mesh has no workload certificate: "
                    "give Mesh a ca= (see `meshlib ca init`) or connect it to a control plane"
                )
            return certs.client_context(certs.peer_check(tls.peer_ids))
        context = self._files.get(tls)
        if context is None:
            with self._lock:
                context = self._files.get(tls) or _file_context(tls)
                self._files[tls] = context
        return context


def _file_context(tls: TlsOrigination) -> ssl.SSLContext:
    """SIMPLE / MUTUAL, Envoy style: the named CA (or the system's), host-name check unless SANs are given."""
    try:
        context = ssl.create_default_context(cafile=tls.ca_certificates)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(f"caCertificates {tls.ca_certificates!r} cannot be loaded: {_reason(exc)}") from None
    context.set_alpn_protocols(ALPN)
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif tls.peer_ids:
        context.check_hostname = False
        context.sslobject_class = CheckedSSLObject
        context.sslsocket_class = CheckedSSLSocket
        context.meshlib_peer_check = NameCheck(tls.peer_ids)  # type: ignore[attr-defined]
    if tls.mode == "MUTUAL":
        cert, key = tls.client_certificate or "", tls.private_key or ""
        for what, path in (("clientCertificate", cert), ("privateKey", key)):
            if not os.path.isfile(path):
                raise CertificateError(f"{what} {path!r} (DestinationRule tls MUTUAL) does not exist")
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise CertificateError(
                f"clientCertificate {cert!r} and privateKey {key!r} cannot be used: {_reason(exc)}"
            ) from None
    return context


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__
