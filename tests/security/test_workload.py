"""The workload certificate: issued for the workload's identity, renewed at half life, swapped without a gap."""

from __future__ import annotations

import os
import ssl
import stat
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from meshlib import CertificateError
from meshlib.policy import SpiffeId
from meshlib.security import (
    CertificateAuthority,
    IssuedCertificate,
    LocalIssuer,
    PeerIdentityError,
    WorkloadCertificates,
    renewal_at,
)

ORDER = SpiffeId.of("default", "order")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


class Flaky:
    """An issuer that fails when told to (the control plane is down)."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.down = False
        self.calls = 0

    def issue(self, csr_pem: bytes, identity: SpiffeId, ttl: float) -> IssuedCertificate:
        self.calls += 1
        if self.down:
            raise ConnectionError("control plane unreachable")
        return self.ca.sign(csr_pem, identity=identity, ttl=ttl)


def test_the_certificate_names_the_workload_and_lives_the_configured_ttl(ca: CertificateAuthority) -> None:
    certs = WorkloadCertificates(ORDER, LocalIssuer(ca), ttl=3600)
    leaf = x509.load_pem_x509_certificate(certs.issued.leaf_pem)
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [ORDER]
    assert certs.issued.ttl == pytest.approx(3600, abs=61)  # backdated a minute for clock skew


def test_renewal_is_at_the_grace_ratio_with_a_little_jitter(ca: CertificateAuthority) -> None:
    certs = WorkloadCertificates(ORDER, LocalIssuer(ca), ttl=1000, grace_ratio=0.5, jitter=0.01)
    issued = certs.issued
    assert issued.not_before + 0.49 * issued.ttl <= certs.renew_at <= issued.not_before + 0.51 * issued.ttl
    assert renewal_at(issued, 0.8, 0.0) == pytest.approx(issued.not_before + 0.8 * issued.ttl)


def test_renew_swaps_key_certificate_and_contexts(ca: CertificateAuthority) -> None:
    certs = WorkloadCertificates(ORDER, LocalIssuer(ca), ttl=3600)
    first, server = certs.issued, certs.server_context()
    client = certs.client_context(certs.peer_check())
    seen: list[int] = []
    certs.on_rotate(lambda c: seen.append(c.generation))
    certs.renew()
    assert certs.generation == 2
    assert seen == [2]
    assert certs.issued.serial != first.serial
    assert certs.server_context() is not server
    assert certs.client_context(certs.peer_check()) is not client


def test_the_background_thread_renews_before_expiry(ca: CertificateAuthority) -> None:
    certs = WorkloadCertificates(ORDER, LocalIssuer(ca), ttl=2.0, jitter=0.0)
    rotated = threading.Event()
    certs.on_rotate(lambda _: rotated.set())
    certs.start()
    try:
        assert rotated.wait(10), "no renewal within 10 s of a 2 s certificate"
        assert certs.generation >= 2
    finally:
        certs.stop()


def test_a_failing_issuer_keeps_the_old_certificate_in_force(
    ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    issuer = Flaky(ca)
    certs = WorkloadCertificates(ORDER, issuer, ttl=3600)
    issuer.down = True
    before = certs.issued
    with pytest.raises(ConnectionError):
        certs.renew()
    assert certs.issued is before
    assert certs.generation == 1


def test_the_thread_logs_a_failed_renewal_and_retries(
    ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    issuer = Flaky(ca)
    certs = WorkloadCertificates(ORDER, issuer, ttl=1.0, jitter=0.0)
    issuer.down = True
    certs.start()
    try:
        deadline = time.monotonic() + 10
        while issuer.calls < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        issuer.down = False
        while certs.generation < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        certs.stop()
    assert certs.generation >= 2, "renewal did not recover once the issuer came back"
    assert "renewing the certificate" in caplog.text
    assert "stays in force" in caplog.text


class Wrong:
    """An issuer that answers with a certificate for someone else."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca

    def issue(self, csr_pem: bytes, identity: SpiffeId, ttl: float) -> IssuedCertificate:
        return self.ca.issue(SpiffeId.of("default", "someone-else"), ttl=ttl)[1]


def test_a_certificate_for_another_key_or_identity_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(CertificateError, match="another key"):
        WorkloadCertificates(ORDER, Wrong(ca))


def test_files_for_the_sidecar_have_a_0600_key_and_are_rewritten_on_renewal(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    folder = tmp_path / "certs"
    certs = WorkloadCertificates(ORDER, LocalIssuer(ca), ttl=3600, files=folder)
    key = folder / "key.pem"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    first = (folder / "cert-chain.pem").read_bytes()
    certs.renew()
    assert (folder / "cert-chain.pem").read_bytes() != first
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    # The files are a usable identity: the key matches the chain.
    ssl.create_default_context().load_cert_chain(folder / "cert-chain.pem", key)
    assert not list(folder.glob("*.tmp"))


def test_no_private_key_in_reprs_or_errors(ca: CertificateAuthority) -> None:
    certs = WorkloadCertificates(ORDER, LocalIssuer(ca))
    assert "PRIVATE" not in repr(certs)
    with pytest.raises(CertificateError) as info:
        WorkloadCertificates(ORDER, Wrong(ca))
    assert "PRIVATE" not in str(info.value)


def test_peer_check_refuses_another_trust_domain_and_unexpected_ids(ca: CertificateAuthority) -> None:
    certs = WorkloadCertificates(ORDER, LocalIssuer(ca))
    check = certs.peer_check(["spiffe://cluster.local/ns/default/sa/reviews"])
    cert = {"subjectAltName": (("URI", "spiffe://cluster.local/ns/default/sa/reviews"),)}
    assert check.verify(cert) == "spiffe://cluster.local/ns/default/sa/reviews"
    with pytest.raises(PeerIdentityError, match="expected"):
        check.verify({"subjectAltName": (("URI", "spiffe://cluster.local/ns/default/sa/evil"),)})
    with pytest.raises(PeerIdentityError, match="trust domain"):
        certs.peer_check().verify({"subjectAltName": (("URI", "spiffe://evil.local/ns/default/sa/reviews"),)})
    with pytest.raises(PeerIdentityError, match="no SPIFFE id"):
        check.verify({"subjectAltName": (("DNS", "reviews"),)})
    with pytest.raises(PeerIdentityError, match="2 URI SANs"):
        check.verify({"subjectAltName": (("URI", "spiffe://a/ns/b/sa/c"), ("URI", "spiffe://a/ns/b/sa/d"))})


def test_a_restart_starts_from_the_files_of_the_last_run_without_the_issuer(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """A workload restarting while the control plane is down keeps its identity from the cached files."""
    folder = tmp_path / "certs"
    first = WorkloadCertificates(ORDER, LocalIssuer(ca), ttl=3600, files=folder)
    issuer = Flaky(ca)
    issuer.down = True
    again = WorkloadCertificates.from_files(ORDER, issuer, folder, ttl=3600, jitter=0.0)
    assert issuer.calls == 0
    assert again.issued.serial == first.issued.serial
    assert again.issued.chain_pem == first.issued.chain_pem
    assert again.renew_at == pytest.approx(first.issued.not_before + 0.5 * first.issued.ttl)
    # Once the issuer is back, renewal replaces the files as usual.
    issuer.down = False
    again.renew()
    assert again.generation == 2
    assert (folder / "cert-chain.pem").read_bytes() == again.issued.chain_pem
    assert stat.S_IMODE(os.stat(folder / "key.pem").st_mode) == 0o600


def test_files_past_their_renewal_time_are_renewed_at_once(ca: CertificateAuthority, tmp_path: Path) -> None:
    folder = tmp_path / "certs"
    WorkloadCertificates(ORDER, LocalIssuer(ca), ttl=1.0, files=folder, jitter=0.0)
    time.sleep(0.2)  # with the minute of backdating, half its life is long past
    certs = WorkloadCertificates.from_files(ORDER, LocalIssuer(ca), folder, ttl=3600, jitter=0.0)
    rotated = threading.Event()
    certs.on_rotate(lambda c: rotated.set())
    certs.start()
    try:
        assert rotated.wait(5)
        assert certs.generation == 2
    finally:
        certs.stop()


def test_unusable_files_are_refused_clearly(ca: CertificateAuthority, tmp_path: Path) -> None:
    folder = tmp_path / "certs"
    with pytest.raises(CertificateError, match="no such file"):
        WorkloadCertificates.from_files(ORDER, LocalIssuer(ca), folder)
    WorkloadCertificates(ORDER, LocalIssuer(ca), ttl=3600, files=folder)
    with pytest.raises(CertificateError, match=r"cert-chain.pem holds a certificate for .*someone-else"):
        WorkloadCertificates.from_files(SpiffeId.of("default", "someone-else"), LocalIssuer(ca), folder)
    os.chmod(folder / "key.pem", 0o644)
    with pytest.raises(CertificateError, match="too open"):
        WorkloadCertificates.from_files(ORDER, LocalIssuer(ca), folder)
    os.chmod(folder / "key.pem", 0o600)
    later = time.time() + 7200  # two hours on, the one-hour certificate is over
    with pytest.raises(CertificateError, match="already expired"):
        WorkloadCertificates.from_files(ORDER, LocalIssuer(ca), folder, clock=lambda: later)
    key_pem = (folder / "key.pem").read_bytes()
    other = tmp_path / "other"
    WorkloadCertificates(ORDER, LocalIssuer(ca), ttl=3600, files=other)
    (other / "key.pem").write_bytes(key_pem)  # a key that does not match the chain (a half-written pair)
    with pytest.raises(CertificateError, match="another key"):
        WorkloadCertificates.from_files(ORDER, LocalIssuer(ca), other)
