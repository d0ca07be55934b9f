"""The workload's certificate: obtained from an issuer, renewed before it expires.

Renewal follows Istio: once ``graceRatio`` of the lifetime has passed (half, with a
little jitter so replicas do not renew together), a new key and CSR go to the
issuer. The new certificate is swapped in by one assignment: connections opened
from then on use it, connections already open (and requests on them) carry on
with the old one until they close. If the issuer fails, the old certificate stays
in force and renewal is retried with backoff until it expires.

When a rotation is due is computed here without a clock (``renewal_at``); the
thread that waits for it (``start``) is the only part that sleeps.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from .._exceptions import CertificateError
from ..policy import SpiffeId
from ._ca import DEFAULT_WORKLOAD_TTL, CertificateAuthority, IssuedCertificate, make_csr, new_private_key
from ._pem import certificates_pem, load_certificates, load_signing_key, read_file, read_private_file
from ._tls import PeerCheck, client_context, server_context

__all__ = [
    "DEFAULT_GRACE_RATIO",
    "DEFAULT_JITTER",
    "Issuer",
    "LocalIssuer",
    "WorkloadCertificates",
    "renewal_at",
    "write_files",
]

log = logging.getLogger("meshlib.security")

DEFAULT_GRACE_RATIO = 0.5
DEFAULT_JITTER = 0.01
"""Istio's SECRET_GRACE_PERIOD_RATIO_JITTER: the grace ratio moves by up to this much either way."""

RETRY_MAX_WAIT = 60.0
"""Longest wait between failed renewals."""


class Issuer(Protocol):
    """Signs a workload's CSR: the local CA in static mode, the control plane when connected."""

    def issue(self, csr_pem: bytes, identity: SpiffeId, ttl: float) -> IssuedCertificate: ...


@dataclass(frozen=True)
class LocalIssuer:
    """Static mode: a CA on this machine signs the workload's own requests."""

    ca: CertificateAuthority

    def issue(self, csr_pem: bytes, identity: SpiffeId, ttl: float) -> IssuedCertificate:
        return self.ca.sign(csr_pem, identity=identity, ttl=ttl)


def renewal_at(issued: IssuedCertificate, grace_ratio: float, jitter: float) -> float:
    """When to renew: ``grace_ratio`` (moved by ``jitter``, a draw in [-j, +j]) into the lifetime."""
    ratio = min(max(grace_ratio + jitter, 0.05), 0.95)
    return issued.not_before + issued.ttl * ratio


@dataclass(frozen=True, slots=True)
class _State:
    """One generation: a key, its certificate, and the contexts built on them."""

    key: PrivateKeyTypes
    issued: IssuedCertificate
    generation: int
    renew_at: float
    server: ssl.SSLContext
    clients: dict[PeerCheck, ssl.SSLContext] = field(default_factory=dict)


class WorkloadCertificates:
    """A workload's key and certificate, renewed before they expire, and the TLS contexts built on them."""

    def __init__(
        self,
        identity: SpiffeId,
        issuer: Issuer,
        *,
        ttl: float = DEFAULT_WORKLOAD_TTL,
        grace_ratio: float = DEFAULT_GRACE_RATIO,
        jitter: float = DEFAULT_JITTER,
        trust_domains: Iterable[str] = (),
        files: str | os.PathLike[str] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        initial: tuple[PrivateKeyTypes, IssuedCertificate] | None = None,
    ) -> None:
        """``initial``: a key and certificate to start with instead of asking the issuer now
        (checked like an issued one; :meth:`from_files` reads them from a previous run).
        """
        self.identity = identity
        self.trust_domains = frozenset(trust_domains) | {identity.trust_domain}
        self._issuer = issuer
        self._ttl = ttl
        self._grace = grace_ratio
        self._jitter = jitter
        self._files = os.fspath(files) if files is not None else None
        self._rng = rng or random.Random()
        self._clock = clock
        self._listeners: list[Callable[[WorkloadCertificates], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0
        self._state = self._obtain(1) if initial is None else self._adopt(*initial)

    @classmethod
    def from_files(
        cls,
        identity: SpiffeId,
        issuer: Issuer,
        files: str | os.PathLike[str],
        **options: Any,
    ) -> WorkloadCertificates:
        """Start from the key and certificate an earlier run left in ``files``, without asking the issuer.

        For a workload that restarts while its issuer (the control plane) is down: a
        certificate that is still valid lets it keep its identity. Renewal then goes
        on as usual, at once if the certificate is past its renewal time. Raises
        ``CertificateError`` when the files are missing, unreadable, for another
        identity or key, or expired; ``options`` are the constructor's.
        """
        folder = Path(files)
        key = load_signing_key(read_private_file(folder / "key.pem"), str(folder / "key.pem"))
        chain = load_certificates(read_file(folder / "cert-chain.pem"), str(folder / "cert-chain.pem"))
        roots = read_file(folder / "root-cert.pem")
        load_certificates(roots, str(folder / "root-cert.pem"))
        leaf = chain[0]
        issued = IssuedCertificate(
            chain_pem=certificates_pem(*chain),
            bundle_pem=roots,
            identity=identity,
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=leaf.not_valid_after_utc.timestamp(),
            serial=leaf.serial_number,
        )
        return cls(identity, issuer, files=folder, initial=(key, issued), **options)

    # -- what adapters read --------------------------------------------------------

    @property
    def issued(self) -> IssuedCertificate:
        return self._state.issued

    @property
    def generation(self) -> int:
        """Counts certificates: 1 for the first, +1 per renewal."""
        return self._state.generation

    @property
    def renew_at(self) -> float:
        return self._state.renew_at

    def server_context(self) -> ssl.SSLContext:
        """The context new inbound connections handshake with (requires a mesh client certificate)."""
        return self._state.server

    def client_context(self, check: PeerCheck) -> ssl.SSLContext:
        """A context for ISTIO_MUTUAL to a peer that must pass ``check`` (one per check and generation)."""
        state = self._state
        context = state.clients.get(check)
        if context is None:
            context = client_context(state.issued.chain_pem, state.key, state.issued.bundle_pem, check)
            state.clients[check] = context
        return context

    def peer_check(self, identities: Iterable[str] = ()) -> PeerCheck:
        return PeerCheck(self.trust_domains, frozenset(identities), who="server")

    def on_rotate(self, listener: Callable[[WorkloadCertificates], None]) -> None:
        """Call ``listener`` after each renewal (from the renewing thread)."""
        self._listeners.append(listener)

    # -- renewal -------------------------------------------------------------------

    def renew(self) -> IssuedCertificate:
        """Get a new key and certificate now and put them in force; on failure the old ones stay."""
        state = self._obtain(self._state.generation + 1)
        self._state = state
        log.info(
            "meshlib: certificate for %s renewed (serial %x, valid until %s)",
            self.identity,
            state.issued.serial,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.issued.not_after)),
        )
        for listener in list(self._listeners):
            listener(self)
        return state.issued

    def _obtain(self, generation: int) -> _State:
        key = new_private_key()
        issued = self._issuer.issue(make_csr(self.identity, key), self.identity, self._ttl)
        return self._state_for(key, issued, generation, "the issuer returned", write=True)

    def _adopt(self, key: PrivateKeyTypes, issued: IssuedCertificate) -> _State:
        """The first generation from a key and certificate we already hold (the files, if any, are already there)."""
        source = f"{os.path.join(self._files, 'cert-chain.pem')} holds" if self._files else "initial= holds"
        return self._state_for(key, issued, 1, source, write=False)

    def _state_for(
        self, key: PrivateKeyTypes, issued: IssuedCertificate, generation: int, source: str, *, write: bool
    ) -> _State:
        self._check_issued(issued, key, source)
        draw = self._rng.uniform(-self._jitter, self._jitter) if self._jitter else 0.0
        server = server_context(issued.chain_pem, key, issued.bundle_pem, self.trust_domains)
        state = _State(key, issued, generation, renewal_at(issued, self._grace, draw), server)
        if write and self._files is not None:
            write_files(self._files, key, issued)
        return state

    def _check_issued(self, issued: IssuedCertificate, key: PrivateKeyTypes, source: str) -> None:
        """Refuse what the issuer sent back (or the files hold) unless it is a live certificate for our key and id."""
        try:
            leaf = x509.load_pem_x509_certificate(issued.leaf_pem)
        except ValueError:
            raise CertificateError(f"{source} a certificate that cannot be parsed") from None
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if leaf.public_key().public_bytes(der, public) != key.public_key().public_bytes(der, public):
            raise CertificateError(f"{source} a certificate for another key")
        try:
            sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if uris != [str(self.identity)]:
            raise CertificateError(f"{source} a certificate for {uris}, not {self.identity}")
        if issued.not_after <= self._clock():
            raise CertificateError(f"{source} a certificate that has already expired")

    def start(self) -> None:
        """Renew in a background thread from now on (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"meshlib-certs-{self.identity}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            state = self._state
            delay = max(0.0, state.renew_at - self._clock())
            if self._failures:
                delay = min(_backoff(self._failures), max(0.0, state.issued.not_after - self._clock()))
            if self._stop.wait(delay):
                return
            try:
                self.renew()
                self._failures = 0
            except Exception as exc:  # the issuer is down or refused: keep the old certificate, retry
                self._failures += 1
                left = state.issued.not_after - self._clock()
                log.error(
                    "meshlib: renewing the certificate of %s failed (%s); the current one stays in force "
                    "for %.0f s more, retrying",
                    self.identity,
                    exc,
                    left,
                )

    def __repr__(self) -> str:
        return f"<WorkloadCertificates {self.identity} generation={self.generation}>"


def _backoff(failures: int) -> float:
    """Seconds before renewal attempt ``failures + 1``: 1 s doubling to 60 s."""
    return min(RETRY_MAX_WAIT, 2.0 ** (failures - 1))


def write_files(directory: str, key: PrivateKeyTypes, issued: IssuedCertificate) -> None:
    """Write ``cert-chain.pem``, ``key.pem`` (0600) and ``root-cert.pem`` for a process that reads files.

    Each file is replaced atomically, so a reader never sees half a certificate or
    a key that does not match the chain for long (key first, then the chain).
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    clear = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _replace(os.path.join(directory, "key.pem"), clear, 0o600)
    _replace(os.path.join(directory, "cert-chain.pem"), issued.chain_pem, 0o644)
    _replace(os.path.join(directory, "root-cert.pem"), issued.bundle_pem, 0o644)


def _replace(path: str, data: bytes, mode: int) -> None:
    temp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask cannot widen, but an old temp file could have other bits
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
