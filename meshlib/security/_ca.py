"""The mesh's certificate authority: istiod's CA, in-process.

Workload certificates look like Istio's so that Istio tooling and openssl read them
alike: the SPIFFE id is the only name (a URI SAN, critical because the subject is
empty), they last 24 h by default and never outlive the CA. The CA refuses what
istiod refuses: a name the caller is not entitled to, extra names, weak keys.
``load``/``save`` use Istio's plug-in CA files (``cacerts``), so a CA made here can be
handed to istiod and one made for istiod can be used here.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .._exceptions import CertificateError, CertificateRequestError
from ..policy import DEFAULT_TRUST_DOMAIN, SpiffeId
from ._pem import (
    SIGNING_KEY_TYPES,
    SigningKey,
    certificates_pem,
    load_certificates,
    load_signing_key,
    private_key_pem,
    read_file,
    read_private_file,
    write_files,
)

__all__ = [
    "DEFAULT_WORKLOAD_TTL",
    "MAX_WORKLOAD_TTL",
    "CertificateAuthority",
    "IssuedCertificate",
    "make_csr",
    "new_private_key",
]

DEFAULT_WORKLOAD_TTL = 86400.0
"""Seconds a workload certificate lasts by default: Istio's 24 h."""
MAX_WORKLOAD_TTL = 90 * 86400.0
"""The longest workload certificate the CA signs: Istio's ``max-workload-cert-ttl``."""
CLOCK_SKEW = 60.0
"""Certificates start this many seconds in the past, so a peer whose clock is behind accepts them."""

_MAX_CA_TTL = 100 * 365 * 86400.0  # far enough; bounded so dates stay within what X.509 and datetime hold
_CA_CERT, _CA_KEY, _ROOT_CERT, _CERT_CHAIN, _META = (
    "ca-cert.pem",
    "ca-key.pem",
    "root-cert.pem",
    "cert-chain.pem",
    "meshlib.json",
)
_STRONG_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_END = b"-----END CERTIFICATE-----\n"
_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def new_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 key: Istio's ECC choice, fast to make and to handshake with."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(identity: SpiffeId, key: PrivateKeyTypes) -> bytes:
    """A PEM CSR for ``identity`` as istio-agent sends it: empty subject, the id as its one URI SAN."""
    uri = _spiffe_id(identity, CertificateRequestError)
    if not isinstance(key, SIGNING_KEY_TYPES):
        raise CertificateRequestError(f"a {type(key).__name__} cannot sign a certificate request")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(uri))]), critical=True)
        .sign(key, _hash_for(key))
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class IssuedCertificate:
    """A signed workload certificate, with what a TLS context needs next to it.

    ``chain_pem`` is the leaf then the intermediates up to, not including, the root:
    what a workload presents. ``bundle_pem`` is the root(s) peers verify it against.
    ``not_before`` is backdated by ``CLOCK_SKEW``, so ``ttl`` is the requested ttl
    plus that minute (unless the CA's expiry cut it short).
    """

    chain_pem: bytes
    bundle_pem: bytes
    identity: SpiffeId
    not_before: float
    not_after: float
    serial: int

    @property
    def leaf_pem(self) -> bytes:
        return self.chain_pem[: self.chain_pem.index(_END) + len(_END)]

    @property
    def ttl(self) -> float:
        return self.not_after - self.not_before


class CertificateAuthority:
    """Signs workload certificates for one trust domain.

    Make one with ``create`` (a self-signed root), ``create_intermediate`` (under a
    root you keep elsewhere) or ``load`` (Istio's plug-in CA folder); the constructor
    trusts its arguments and is for those.
    """

    trust_domain: str

    def __init__(
        self,
        *,
        key: SigningKey,
        certificate: x509.Certificate,
        chain: list[x509.Certificate],
        roots: list[x509.Certificate],
        trust_domain: str,
    ) -> None:
        self.trust_domain = trust_domain
        self._key = key
        self._cert = certificate
        self._chain = tuple(chain)  # from the CA's certificate up to its root, both included
        self._roots = tuple(roots)
        self._intermediates = tuple(c for c in self._chain if c not in self._roots)

    def __repr__(self) -> str:
        return f"<CertificateAuthority {self._cert.subject.rfc4514_string()!r} for {self.trust_domain!r}>"

    @classmethod
    def create(
        cls, trust_domain: str = DEFAULT_TRUST_DOMAIN, *, ttl: float = 10 * 365 * 86400, now: float | None = None
    ) -> CertificateAuthority:
        """A new self-signed root CA (EC P-256), valid ``ttl`` seconds: its own trust bundle."""
        _check_trust_domain(trust_domain)
        now = time.time() if now is None else now
        _check_ca_ttl(ttl)
        key = new_private_key()
        name = _ca_name(trust_domain, "meshlib root CA")
        cert = (
            _ca_builder(name, name, key, now - CLOCK_SKEW, now + ttl, path_length=None)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key=key, certificate=cert, chain=[cert], roots=[cert], trust_domain=trust_domain)

    @classmethod
    def create_intermediate(
        cls,
        root_cert_pem: bytes,
        root_key_pem: bytes,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        ttl: float = 365 * 86400,
        now: float | None = None,
    ) -> CertificateAuthority:
        """A new intermediate CA signed by a root kept elsewhere (pathlen 0: it signs workloads only).

        The root is the trust bundle; its key is used once, here, and not kept. The
        intermediate never outlives the root.
        """
        _check_trust_domain(trust_domain)
        now = time.time() if now is None else now
        _check_ca_ttl(ttl)
        certs = load_certificates(root_cert_pem, "the root certificate")
        if len(certs) != 1:
            raise CertificateError(f"the root certificate: holds {len(certs)} certificates; give the root alone")
        root = certs[0]
        root_key = load_signing_key(root_key_pem, "the root key")
        _check_ca_pair(root, root_key, "the root certificate", "the root key", now)
        if not _issued_by(root, root):
            raise CertificateError("the root certificate is not self-signed: give the root CA itself")
        constraints = _basic_constraints(root)
        if constraints is not None and constraints.path_length == 0:
            raise CertificateError("the root certificate has pathlen 0: it may not sign an intermediate CA")
        key = new_private_key()
        not_after = min(now + ttl, root.not_valid_after_utc.timestamp())
        cert = (
            _ca_builder(
                root.subject,
                _ca_name(trust_domain, "meshlib intermediate CA"),
                key,
                now - CLOCK_SKEW,
                not_after,
                path_length=0,
            )
            .add_extension(_authority_key_id(root, root_key), critical=False)
            .sign(root_key, _hash_for(root_key))
        )
        return cls(key=key, certificate=cert, chain=[cert, root], roots=[root], trust_domain=trust_domain)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], trust_domain: str | None = None) -> CertificateAuthority:
        """Load Istio's plug-in CA folder: ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem.

        The trust domain comes from the ``meshlib.json`` ``save`` wrote, else from
        ``trust_domain`` (default ``cluster.local``); naming one that contradicts the
        file is an error. Everything is checked now, so a bad folder fails at start-up
        rather than at the first certificate a workload asks for.
        """
        folder = Path(directory)
        if not folder.is_dir():
            raise CertificateError(
                f"{folder}: no such CA folder (it holds {_CA_CERT}, {_CA_KEY}, {_ROOT_CERT} and {_CERT_CHAIN})"
            )
        paths = {name: folder / name for name in (_CA_CERT, _CA_KEY, _ROOT_CERT, _CERT_CHAIN, _META)}
        missing = [name for name in (_CA_CERT, _CA_KEY, _ROOT_CERT, _CERT_CHAIN) if not paths[name].exists()]
        if missing:
            raise CertificateError(f"{folder}: missing {', '.join(missing)} (Istio's plug-in CA files)")
        certs = load_certificates(read_file(paths[_CA_CERT]), str(paths[_CA_CERT]))
        if len(certs) != 1:
            raise CertificateError(
                f"{paths[_CA_CERT]}: holds {len(certs)} certificates; it is the CA's own alone "
                f"(the chain goes in {_CERT_CHAIN})"
            )
        key = load_signing_key(read_private_file(paths[_CA_KEY]), str(paths[_CA_KEY]))
        roots = load_certificates(read_file(paths[_ROOT_CERT]), str(paths[_ROOT_CERT]))
        chain = load_certificates(read_file(paths[_CERT_CHAIN]), str(paths[_CERT_CHAIN]))
        domain = _saved_trust_domain(paths[_META], trust_domain)
        _check_ca_pair(certs[0], key, str(paths[_CA_CERT]), str(paths[_CA_KEY]), time.time())
        chain = _chain_to_root(certs[0], chain, roots, str(paths[_CERT_CHAIN]), str(paths[_ROOT_CERT]))
        return cls(key=key, certificate=certs[0], chain=chain, roots=roots, trust_domain=domain)

    def save(self, directory: str | os.PathLike[str], *, overwrite: bool = False) -> list[Path]:
        """Write the CA as Istio's plug-in CA folder (plus ``meshlib.json``); return the paths written.

        The folder is made 0700 if missing; ca-key.pem is 0600 from its first byte.
        An existing ca-key.pem is replaced only with ``overwrite=True``: losing a CA
        key silently orphans every certificate it signed.
        """
        folder = Path(directory)
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise CertificateError(f"{folder}: cannot create the CA folder ({exc.strerror or exc})") from None
        key_path = folder / _CA_KEY
        if not overwrite and (key_path.exists() or key_path.is_symlink()):
            raise CertificateError(f"{key_path}: a CA key is already there; refusing to replace it (overwrite=True)")
        meta = json.dumps({"trustDomain": self.trust_domain}).encode() + b"\n"
        return write_files(
            folder,
            {
                _CA_CERT: (certificates_pem(self._cert), 0o644),
                _CA_KEY: (private_key_pem(self._key), 0o600),
                _ROOT_CERT: (self.bundle_pem, 0o644),
                _CERT_CHAIN: (certificates_pem(*self._chain), 0o644),
                _META: (meta, 0o644),
            },
        )

    @property
    def certificate_pem(self) -> bytes:
        return certificates_pem(self._cert)

    @property
    def bundle_pem(self) -> bytes:
        return certificates_pem(*self._roots)

    @property
    def not_after(self) -> float:
        return self._cert.not_valid_after_utc.timestamp()

    def sign(
        self, csr_pem: bytes, *, identity: SpiffeId, ttl: float = DEFAULT_WORKLOAD_TTL, now: float | None = None
    ) -> IssuedCertificate:
        """Sign a workload's CSR for ``identity``, the id its caller proved to be entitled to.

        The CSR must name exactly that id and nothing else; only its key is used (its
        subject and any extensions it asks for are not copied). The certificate lasts
        ``ttl`` seconds from ``now``, cut short at the CA's own expiry.
        """
        entitled = _spiffe_id(identity, CertificateRequestError)
        if not 0 < ttl <= MAX_WORKLOAD_TTL:
            raise CertificateRequestError(
                f"certificate request refused: ttl must be more than 0 and at most {MAX_WORKLOAD_TTL:.0f} s "
                f"(90 days), not {ttl!r}"
            )
        if entitled.trust_domain != self.trust_domain:
            raise CertificateRequestError(
                f"certificate request refused: {entitled} is in trust domain {entitled.trust_domain}, "
                f"this CA signs for {self.trust_domain}"
            )
        public_key = _check_csr(csr_pem, entitled)
        now = time.time() if now is None else now
        not_after = min(now + ttl, self.not_after)
        if not_after <= now:
            raise CertificateRequestError(
                f"certificate request refused: the CA certificate expired at {_iso(self.not_after)}; rotate the CA"
            )
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_datetime(now - CLOCK_SKEW))
            .not_valid_after(_datetime(not_after))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(entitled))]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(_authority_key_id(self._cert, self._key), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self._key, _hash_for(self._key))
        )
        return IssuedCertificate(
            chain_pem=certificates_pem(leaf, *self._intermediates),
            bundle_pem=self.bundle_pem,
            identity=entitled,
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=leaf.not_valid_after_utc.timestamp(),
            serial=leaf.serial_number,
        )

    def issue(
        self, identity: SpiffeId, *, ttl: float = DEFAULT_WORKLOAD_TTL, now: float | None = None
    ) -> tuple[ec.EllipticCurvePrivateKey, IssuedCertificate]:
        """A new key and its certificate for ``identity``: for tests and static set-ups without an agent."""
        key = new_private_key()
        return key, self.sign(make_csr(identity, key), identity=identity, ttl=ttl, now=now)


def _check_csr(csr_pem: bytes, entitled: SpiffeId) -> CertificatePublicKeyTypes:
    """The CSR's public key, once the CSR proved it holds it, names only ``entitled`` and the key is strong."""
    refused = "certificate request refused"
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, TypeError):
        raise CertificateRequestError(
            f"{refused}: not a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST-----)"
        ) from None
    try:
        valid = csr.is_signature_valid
        public_key = csr.public_key()
        extensions = csr.extensions
    except (ValueError, UnsupportedAlgorithm, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise CertificateRequestError(f"{refused}: the CSR cannot be read ({type(exc).__name__})") from None
    if not valid:
        raise CertificateRequestError(f"{refused}: the CSR's signature is invalid (altered, or not signed by its key)")
    weakness = _key_weakness(public_key)
    if weakness:
        raise CertificateRequestError(f"{refused}: {weakness}")
    try:
        names = list(extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        raise CertificateRequestError(
            f"{refused}: the CSR has no subjectAltName; it must carry {entitled} as its one URI SAN"
        ) from None
    wanted = x509.UniformResourceIdentifier(str(entitled))
    if wanted not in names:
        uris = [n.value for n in names if isinstance(n, x509.UniformResourceIdentifier)]
        if not uris:
            raise CertificateRequestError(f"{refused}: the CSR has no URI SAN; it must carry {entitled}")
        raise CertificateRequestError(
            f"{refused}: the CSR requests {_clip(uris[0])} but the caller is entitled to {entitled}"
        )
    names.remove(wanted)
    if names:
        raise CertificateRequestError(
            f"{refused}: the CSR has extra SANs ({', '.join(map(_describe, names))}); "
            f"a workload certificate names only {entitled}"
        )
    return public_key


def _key_weakness(key: PublicKeyTypes) -> str | None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return None if isinstance(key.curve, _STRONG_CURVES) else f"EC curve {key.curve.name} is too weak (use P-256)"
    if isinstance(key, rsa.RSAPublicKey):
        return None if key.key_size >= 2048 else f"a {key.key_size}-bit RSA key is too weak (at least 2048 bits)"
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return None
    kind = "DSA" if isinstance(key, dsa.DSAPublicKey) else type(key).__name__
    return f"{kind} keys are not accepted (use EC P-256, RSA of 2048 bits or more, or Ed25519)"


def _check_ca_pair(cert: x509.Certificate, key: SigningKey, cert_name: str, key_name: str, now: float) -> None:
    """A CA certificate that may sign now, with its key: the mistakes a CA folder can hold."""
    constraints = _basic_constraints(cert)
    if constraints is None or not constraints.ca:
        raise CertificateError(f"{cert_name}: not a CA certificate (no basicConstraints CA:TRUE)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise CertificateError(f"{cert_name}: its keyUsage does not allow signing certificates (keyCertSign)")
    expiry = cert.not_valid_after_utc.timestamp()
    if expiry <= now:
        raise CertificateError(f"{cert_name}: expired at {_iso(expiry)}; rotate the CA")
    weakness = _key_weakness(key.public_key())
    if weakness:
        raise CertificateError(f"{key_name}: {weakness}")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise CertificateError(f"{key_name}: does not match {cert_name} (it is the key of another certificate)")


def _chain_to_root(
    cert: x509.Certificate,
    chain: list[x509.Certificate],
    roots: list[x509.Certificate],
    chain_name: str,
    roots_name: str,
) -> list[x509.Certificate]:
    """cert-chain.pem checked link by link up to a root of the bundle, the root appended if it was left out."""
    if chain[0] != cert:
        raise CertificateError(f"{chain_name}: does not start with {_CA_CERT} (the chain goes from the CA up)")
    for i, (child, parent) in enumerate(itertools.pairwise(chain)):
        if not _issued_by(child, parent):
            raise CertificateError(f"{chain_name}: certificate {i + 1} is not signed by certificate {i + 2}")
    if chain[-1] in roots:
        return chain
    for root in roots:
        if _issued_by(chain[-1], root):
            return [*chain, root]
    raise CertificateError(
        f"{chain_name}: does not lead to a certificate in {roots_name}; workload certificates would not verify"
    )


def _saved_trust_domain(path: Path, requested: str | None) -> str:
    if not path.exists():
        domain = DEFAULT_TRUST_DOMAIN if requested is None else requested
    else:
        try:
            saved = json.loads(read_file(path))["trustDomain"]
        except (ValueError, KeyError, TypeError):
            saved = None
        if not isinstance(saved, str):
            raise CertificateError(f'{path}: not meshlib CA metadata (expected {{"trustDomain": "..."}})')
        if requested is not None and requested != saved:
            raise CertificateError(f"{path}: this CA signs for trust domain {saved!r}, not {requested!r}")
        domain = saved
    _check_trust_domain(domain)
    return domain


def _spiffe_id(value: SpiffeId, error: type[ValueError]) -> SpiffeId:
    if isinstance(value, SpiffeId):
        return value
    try:
        return SpiffeId(value)
    except ValueError as exc:
        raise error(str(exc)) from None


def _check_trust_domain(trust_domain: str) -> None:
    try:
        SpiffeId.of("default", "default", trust_domain)
    except ValueError:
        raise CertificateError(
            f"invalid trust domain {trust_domain!r}: use letters, digits, '.', '-' and '_' (like cluster.local)"
        ) from None


def _check_ca_ttl(ttl: float) -> None:
    if not 0 < ttl <= _MAX_CA_TTL:
        raise CertificateError(f"a CA's ttl must be more than 0 and at most {_MAX_CA_TTL:.0f} s, not {ttl!r}")


def _ca_name(trust_domain: str, common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_builder(
    issuer: x509.Name,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    not_before: float,
    not_after: float,
    *,
    path_length: int | None,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_datetime(not_before))
        .not_valid_after(_datetime(not_after))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _authority_key_id(issuer: x509.Certificate, issuer_key: SigningKey) -> x509.AuthorityKeyIdentifier:
    """The issuer's own SKI when it has one, so chain builders match the two exactly."""
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _hash_for(key: SigningKey) -> hashes.SHA256 | None:
    # Ed25519/Ed448 sign the message itself; the rest sign its SHA-256.
    return None if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) else hashes.SHA256()


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _describe(name: x509.GeneralName) -> str:
    prefix = {
        x509.UniformResourceIdentifier: "URI",
        x509.DNSName: "DNS",
        x509.IPAddress: "IP",
        x509.RFC822Name: "email",
    }.get(type(name))
    return f"{prefix}:{_clip(str(name.value))}" if prefix else type(name).__name__


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _datetime(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def _iso(seconds: float) -> str:
    return _datetime(seconds).strftime("%Y-%m-%dT%H:%M:%SZ")
