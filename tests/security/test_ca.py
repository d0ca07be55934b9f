"""The CA as workloads and operators meet it: real keys, real files, and openssl as the judge."""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshlib._exceptions import CertificateError, CertificateRequestError
from meshlib.policy import SpiffeId
from meshlib.security._ca import (
    DEFAULT_WORKLOAD_TTL,
    MAX_WORKLOAD_TTL,
    CertificateAuthority,
    IssuedCertificate,
    make_csr,
    new_private_key,
)

ALICE = SpiffeId.of("shop", "a")
BOB = SpiffeId.of("shop", "b")
DAY = 86400.0


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture(scope="module")
def root_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """A root made outside meshlib, as an operator's offline root would be: RSA, by openssl."""
    folder = tmp_path_factory.mktemp("offline-root")
    _openssl_root(folder)
    return (folder / "ca-cert.pem").read_bytes(), (folder / "ca-key.pem").read_bytes()


def openssl() -> str:
    found = shutil.which("openssl")
    if found is None:
        pytest.skip("openssl is not installed")
    return found


def verify(folder: Path, issued: IssuedCertificate, *extra: str) -> subprocess.CompletedProcess[str]:
    """``openssl verify`` of the leaf against the trust bundle, with the chain's intermediates as untrusted."""
    folder = folder / "verify"
    folder.mkdir(exist_ok=True)
    (folder / "root-cert.pem").write_bytes(issued.bundle_pem)
    (folder / "leaf.pem").write_bytes(issued.leaf_pem)
    args = [openssl(), "verify", "-x509_strict", *extra, "-CAfile", str(folder / "root-cert.pem")]
    intermediates = issued.chain_pem[len(issued.leaf_pem) :]
    if intermediates:
        (folder / "intermediates.pem").write_bytes(intermediates)
        args += ["-untrusted", str(folder / "intermediates.pem")]
    return subprocess.run([*args, str(folder / "leaf.pem")], capture_output=True, text=True, check=False)


def csr_with(
    key: CertificateIssuerPrivateKeyTypes, names: list[x509.GeneralName] | None, digest: hashes.SHA256 | None = None
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(key, digest).public_bytes(serialization.Encoding.PEM)


def spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def leaf_of(issued: IssuedCertificate) -> x509.Certificate:
    return x509.load_pem_x509_certificate(issued.leaf_pem)


# --- what the CA issues ---------------------------------------------------------------------------


def test_an_issued_leaf_names_only_the_identity_and_is_a_tls_client_and_server(ca: CertificateAuthority) -> None:
    key, issued = ca.issue(ALICE)
    leaf = leaf_of(issued)
    ext = leaf.extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # the subject is empty, so RFC 5280 wants the SAN critical
    assert list(san.value) == [x509.UniformResourceIdentifier(ALICE)]
    assert leaf.subject == x509.Name([])
    assert issued.identity == ALICE
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert spki(leaf.public_key()) == spki(key.public_key())
    basic = ext.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca is False
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert usage.value.key_encipherment
    assert not usage.value.key_cert_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ca_ski = x509.load_pem_x509_certificate(ca.certificate_pem).extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    )
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.value.digest
    ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    assert leaf.serial_number == issued.serial
    assert issued.serial.bit_length() > 64


def test_the_default_ttl_is_24_hours_backdated_a_minute_for_clock_skew(ca: CertificateAuthority) -> None:
    now = time.time()
    _, issued = ca.issue(ALICE, now=now)
    assert issued.not_after == pytest.approx(now + DEFAULT_WORKLOAD_TTL, abs=1)
    assert issued.not_before == pytest.approx(now - 60, abs=1)
    assert issued.ttl == pytest.approx(DEFAULT_WORKLOAD_TTL + 60, abs=1)
    leaf = leaf_of(issued)
    assert leaf.not_valid_after_utc.timestamp() == issued.not_after
    assert leaf.not_valid_before_utc.timestamp() == issued.not_before


def test_a_root_ca_leaf_verifies_with_openssl_against_the_bundle(ca: CertificateAuthority, tmp_path: Path) -> None:
    _, issued = ca.issue(ALICE)
    assert issued.chain_pem == issued.leaf_pem  # the root is the bundle, not part of the chain
    assert issued.bundle_pem == ca.certificate_pem
    result = verify(tmp_path, issued, "-purpose", "sslserver")
    assert result.returncode == 0, result.stdout + result.stderr
    assert verify(tmp_path, issued, "-purpose", "sslclient").returncode == 0


def test_an_intermediate_ca_leaf_verifies_through_the_intermediate(
    root_files: tuple[bytes, bytes], tmp_path: Path
) -> None:
    root_pem, root_key_pem = root_files
    intermediate = CertificateAuthority.create_intermediate(root_pem, root_key_pem)
    _, issued = intermediate.issue(ALICE)
    assert issued.bundle_pem == x509.load_pem_x509_certificate(root_pem).public_bytes(serialization.Encoding.PEM)
    assert issued.chain_pem == issued.leaf_pem + intermediate.certificate_pem
    result = verify(tmp_path, issued)
    assert result.returncode == 0, result.stdout + result.stderr
    inter = x509.load_pem_x509_certificate(intermediate.certificate_pem)
    assert inter.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    # Without the intermediate the leaf does not chain to the root.
    alone = IssuedCertificate(issued.leaf_pem, issued.bundle_pem, ALICE, 0, 0, 0)
    assert verify(tmp_path, alone).returncode != 0


def test_the_root_ca_is_a_ca_named_after_its_trust_domain() -> None:
    ca = CertificateAuthority.create("example.org")
    cert = x509.load_pem_x509_certificate(ca.certificate_pem)
    assert cert.subject.rfc4514_string() == "CN=meshlib root CA,O=example.org"
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert ca.not_after == cert.not_valid_after_utc.timestamp()


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(ec.generate_private_key(ec.SECP384R1()), id="P-384"),
        pytest.param(ed25519.Ed25519PrivateKey.generate(), id="Ed25519"),
        pytest.param(rsa.generate_private_key(65537, 2048), id="RSA-2048"),
    ],
)
def test_strong_keys_of_other_kinds_are_signed(ca: CertificateAuthority, key: CertificateIssuerPrivateKeyTypes) -> None:
    issued = ca.sign(make_csr(ALICE, key), identity=ALICE)
    assert spki(leaf_of(issued).public_key()) == spki(key.public_key())


def test_make_csr_has_an_empty_subject_and_the_identity_as_its_one_san() -> None:
    csr = x509.load_pem_x509_csr(make_csr(ALICE, new_private_key()))
    assert csr.subject == x509.Name([])
    assert csr.is_signature_valid
    assert list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == [
        x509.UniformResourceIdentifier(ALICE)
    ]


def test_a_leaf_never_outlives_its_ca() -> None:
    short = CertificateAuthority.create(ttl=2 * DAY)
    _, issued = short.issue(ALICE, ttl=MAX_WORKLOAD_TTL)
    assert issued.not_after == short.not_after


def test_a_leaf_issued_in_the_past_is_expired_for_openssl(ca: CertificateAuthority, tmp_path: Path) -> None:
    _, issued = ca.issue(ALICE, ttl=3600, now=time.time() - 2 * DAY)
    result = verify(tmp_path, issued)
    assert result.returncode != 0
    assert "expired" in result.stdout + result.stderr


# --- what the CA refuses --------------------------------------------------------------------------


def refusal(ca: CertificateAuthority, csr: bytes, identity: SpiffeId = ALICE, **kwargs: float) -> str:
    with pytest.raises(CertificateRequestError) as caught:
        ca.sign(csr, identity=identity, **kwargs)
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert "PRIVATE KEY" not in message
    return message


def test_a_csr_for_another_identity_is_refused(ca: CertificateAuthority) -> None:
    message = refusal(ca, make_csr(BOB, new_private_key()), identity=ALICE)
    assert f"requests {BOB} but the caller is entitled to {ALICE}" in message


def test_an_identity_of_another_trust_domain_is_refused(ca: CertificateAuthority) -> None:
    other = SpiffeId.of("shop", "a", "other.example")
    message = refusal(ca, make_csr(other, new_private_key()), identity=other)
    assert "trust domain other.example, this CA signs for cluster.local" in message


@pytest.mark.parametrize(
    ("extra", "shown"),
    [
        (x509.DNSName("evil.example"), "DNS:evil.example"),
        (x509.UniformResourceIdentifier(BOB), f"URI:{BOB}"),
        (x509.RFC822Name("a@example.org"), "email:a@example.org"),
    ],
)
def test_extra_sans_are_refused(ca: CertificateAuthority, extra: x509.GeneralName, shown: str) -> None:
    key = new_private_key()
    csr = csr_with(key, [x509.UniformResourceIdentifier(ALICE), extra], hashes.SHA256())
    message = refusal(ca, csr)
    assert "extra SANs" in message
    assert shown in message


def test_the_same_uri_twice_is_refused(ca: CertificateAuthority) -> None:
    key = new_private_key()
    uri = x509.UniformResourceIdentifier(ALICE)
    assert "extra SANs" in refusal(ca, csr_with(key, [uri, uri], hashes.SHA256()))


def test_a_csr_without_a_san_is_refused(ca: CertificateAuthority) -> None:
    assert "no subjectAltName" in refusal(ca, csr_with(new_private_key(), None, hashes.SHA256()))
    only_dns = csr_with(new_private_key(), [x509.DNSName("a.shop")], hashes.SHA256())
    assert "no URI SAN" in refusal(ca, only_dns)


@pytest.mark.parametrize(
    ("key", "why"),
    [
        pytest.param(rsa.generate_private_key(65537, 1024), "1024-bit RSA key is too weak", id="RSA-1024"),
        pytest.param(ec.generate_private_key(ec.SECP224R1()), "EC curve secp224r1 is too weak", id="P-224"),
        pytest.param(ec.generate_private_key(ec.SECP256K1()), "EC curve secp256k1", id="secp256k1"),
        pytest.param(dsa.generate_private_key(2048), "DSA keys are not accepted", id="DSA"),
    ],
)
def test_weak_keys_are_refused(ca: CertificateAuthority, key: CertificateIssuerPrivateKeyTypes, why: str) -> None:
    csr = csr_with(key, [x509.UniformResourceIdentifier(ALICE)], hashes.SHA256())
    assert why in refusal(ca, csr)


def test_a_tampered_csr_is_refused_for_its_signature(ca: CertificateAuthority) -> None:
    # Someone edits the requested identity from sa/a to sa/b without the key's say.
    der = x509.load_pem_x509_csr(make_csr(ALICE, new_private_key())).public_bytes(serialization.Encoding.DER)
    assert der.count(b"/sa/a") == 1
    forged = der.replace(b"/sa/a", b"/sa/b")
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(forged) + b"-----END CERTIFICATE REQUEST-----\n"
    assert "signature is invalid" in refusal(ca, pem, identity=BOB)


def test_garbage_is_refused(ca: CertificateAuthority) -> None:
    assert "not a PEM certificate signing request" in refusal(ca, b"hello")
    assert "not a PEM certificate signing request" in refusal(ca, ca.certificate_pem)


@pytest.mark.parametrize("ttl", [0.0, -1.0, MAX_WORKLOAD_TTL + 1, float("nan"), float("inf")])
def test_a_ttl_out_of_range_is_refused(ca: CertificateAuthority, ttl: float) -> None:
    message = refusal(ca, make_csr(ALICE, new_private_key()), ttl=ttl)
    assert "ttl must be more than 0 and at most 7776000 s" in message


def test_the_maximum_ttl_is_allowed(ca: CertificateAuthority) -> None:
    _, issued = ca.issue(ALICE, ttl=MAX_WORKLOAD_TTL)
    assert issued.ttl == pytest.approx(MAX_WORKLOAD_TTL + 60, abs=1)


def test_an_expired_ca_refuses_to_sign() -> None:
    old = CertificateAuthority.create(ttl=3600, now=time.time() - 2 * 3600)
    assert "expired" in refusal(old, make_csr(ALICE, new_private_key()))


# --- the CA folder (Istio's plug-in CA files) -----------------------------------------------------


def test_save_then_load_keeps_the_trust_bundle_and_can_still_sign(ca: CertificateAuthority, tmp_path: Path) -> None:
    folder = tmp_path / "cacerts"
    written = ca.save(folder)
    assert sorted(p.name for p in written) == [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "meshlib.json",
        "root-cert.pem",
    ]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in written)  # no temp files left
    assert (folder / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / "cert-chain.pem").read_bytes() == (folder / "ca-cert.pem").read_bytes()
    loaded = CertificateAuthority.load(folder)
    assert loaded.bundle_pem == ca.bundle_pem
    assert loaded.certificate_pem == ca.certificate_pem
    _, issued = loaded.issue(ALICE)
    assert verify(tmp_path, issued).returncode == 0


def test_an_intermediate_round_trips_with_the_root_at_the_end_of_its_chain(
    root_files: tuple[bytes, bytes], tmp_path: Path
) -> None:
    intermediate = CertificateAuthority.create_intermediate(*root_files, "example.org")
    intermediate.save(tmp_path / "ca")
    chain = x509.load_pem_x509_certificates((tmp_path / "ca" / "cert-chain.pem").read_bytes())
    assert [c.public_bytes(serialization.Encoding.PEM) for c in chain] == [
        intermediate.certificate_pem,
        intermediate.bundle_pem,
    ]
    loaded = CertificateAuthority.load(tmp_path / "ca")
    assert loaded.trust_domain == "example.org"  # from meshlib.json
    _, issued = loaded.issue(SpiffeId.of("shop", "a", "example.org"))
    assert verify(tmp_path, issued).returncode == 0


def test_a_ca_folder_made_by_openssl_as_for_istio_loads(tmp_path: Path) -> None:
    _openssl_root(tmp_path)
    for name in ("root-cert.pem", "cert-chain.pem"):
        shutil.copy(tmp_path / "ca-cert.pem", tmp_path / name)
    loaded = CertificateAuthority.load(tmp_path, trust_domain="cluster.local")
    _, issued = loaded.issue(ALICE)
    assert verify(tmp_path, issued).returncode == 0


def test_save_refuses_to_replace_a_ca_key_unless_asked(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.save(tmp_path)
    other = CertificateAuthority.create()
    with pytest.raises(CertificateError, match=r"ca-key\.pem: a CA key is already there"):
        other.save(tmp_path)
    assert CertificateAuthority.load(tmp_path).bundle_pem == ca.bundle_pem
    other.save(tmp_path, overwrite=True)
    assert CertificateAuthority.load(tmp_path).bundle_pem == other.bundle_pem
    assert (tmp_path / "ca-key.pem").stat().st_mode & 0o777 == 0o600


def test_a_key_readable_by_the_group_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.save(tmp_path)
    (tmp_path / "ca-key.pem").chmod(0o640)
    message = load_error(tmp_path)
    assert "ca-key.pem: permissions 0640 are too open" in message
    assert f"chmod 600 {tmp_path / 'ca-key.pem'}" in message


def test_a_key_of_another_ca_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.save(tmp_path / "a")
    CertificateAuthority.create().save(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "ca-key.pem", tmp_path / "a" / "ca-key.pem")
    assert "ca-key.pem: does not match" in load_error(tmp_path / "a")


def test_a_certificate_that_is_not_a_ca_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    key, issued = ca.issue(ALICE)
    ca.save(tmp_path)
    for name in ("ca-cert.pem", "cert-chain.pem"):
        (tmp_path / name).write_bytes(issued.leaf_pem)
    (tmp_path / "ca-key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    assert "ca-cert.pem: not a CA certificate" in load_error(tmp_path)


def test_an_expired_ca_is_refused(tmp_path: Path) -> None:
    CertificateAuthority.create(ttl=3600, now=time.time() - 2 * 3600).save(tmp_path)
    assert "ca-cert.pem: expired at" in load_error(tmp_path)


@pytest.mark.parametrize("name", ["ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"])
def test_a_missing_file_is_named(ca: CertificateAuthority, tmp_path: Path, name: str) -> None:
    ca.save(tmp_path)
    (tmp_path / name).unlink()
    assert f"missing {name}" in load_error(tmp_path)


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    assert f"{tmp_path / 'nope'}: no such CA folder" in load_error(tmp_path / "nope")


@pytest.mark.parametrize(("name", "why"), [("root-cert.pem", "not a PEM certificate"), ("ca-key.pem", "not a PEM")])
def test_unparsable_files_are_named_without_their_content(
    ca: CertificateAuthority, tmp_path: Path, name: str, why: str
) -> None:
    ca.save(tmp_path)
    damaged = (tmp_path / name).read_bytes().replace(b"M", b"!")
    (tmp_path / name).write_bytes(damaged)
    message = load_error(tmp_path)
    assert f"{name}: {why}" in message
    assert damaged.decode().splitlines()[1] not in message


def test_a_chain_that_does_not_reach_the_bundle_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.save(tmp_path)
    (tmp_path / "root-cert.pem").write_bytes(CertificateAuthority.create().bundle_pem)
    assert "cert-chain.pem: does not lead to a certificate in" in load_error(tmp_path)


def test_the_saved_trust_domain_wins_and_a_contradiction_is_an_error(tmp_path: Path) -> None:
    CertificateAuthority.create("example.org").save(tmp_path)
    assert CertificateAuthority.load(tmp_path).trust_domain == "example.org"
    assert "signs for trust domain 'example.org', not 'cluster.local'" in load_error(tmp_path, "cluster.local")
    (tmp_path / "meshlib.json").unlink()
    assert CertificateAuthority.load(tmp_path).trust_domain == "cluster.local"
    assert CertificateAuthority.load(tmp_path, "other.example").trust_domain == "other.example"


def test_an_intermediate_needs_a_root_ca_and_its_own_key(
    ca: CertificateAuthority, root_files: tuple[bytes, bytes]
) -> None:
    root_pem, root_key_pem = root_files
    key, issued = ca.issue(ALICE)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cases = [
        ((root_pem, key_pem), "the root key: does not match the root certificate"),
        ((issued.leaf_pem, key_pem), "the root certificate: not a CA certificate"),
        ((b"junk", root_key_pem), "the root certificate: not a PEM certificate"),
        ((root_pem, b"junk"), "the root key: not a PEM private key"),
    ]
    for args, expected in cases:
        with pytest.raises(CertificateError) as caught:
            CertificateAuthority.create_intermediate(*args)
        assert expected in str(caught.value)
        assert "PRIVATE KEY" not in str(caught.value)


def load_error(folder: Path, trust_domain: str | None = None) -> str:
    with pytest.raises(CertificateError) as caught:
        CertificateAuthority.load(folder, trust_domain)
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert "PRIVATE KEY" not in message
    return message


def _openssl_root(folder: Path) -> None:
    """An RSA root CA as Istio's docs make one with openssl, with its key 0600."""
    config = folder / "root.cnf"
    config.write_text(
        "[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = ext\n"
        "[dn]\nO = Istio\nCN = Root CA\n"
        "[ext]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n"
        "subjectKeyIdentifier = hash\n"
    )
    keyout, out = folder / "ca-key.pem", folder / "ca-cert.pem"
    subprocess.run(
        [
            openssl(),
            "req",
            "-x509",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-days",
            "3650",
            "-config",
            str(config),
            "-keyout",
            str(keyout),
            "-out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    (folder / "ca-key.pem").chmod(0o600)
