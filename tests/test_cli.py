"""The ``meshlib`` command line as a user runs it: a real process, its output and exit code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

WriteYaml = Callable[[str, str], Path]


def meshlib(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshlib", *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def test_validate_the_corpus_exits_0_and_lists_what_is_not_enforced(corpus: Path) -> None:
    result = meshlib("validate", corpus)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning:" in result.stdout
    assert "requestPrincipals: accepted but not enforced" in result.stdout
    assert "valid: 0 error(s)" in result.stderr


def test_validate_a_broken_file_exits_1_naming_file_resource_and_field(write_yaml: WriteYaml) -> None:
    path = write_yaml(
        "broken.yaml",
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews, namespace: shop}
        spec:
          host: reviews
          trafficPolicy:
            outlierDetection:
              interval: often
        """,
    )
    result = meshlib("validate", path)
    assert result.returncode == 1
    line = result.stdout.strip()
    assert line.startswith("error: ")
    assert "broken.yaml" in line
    assert "DestinationRule/shop/reviews" in line
    assert "spec.trafficPolicy.outlierDetection.interval" in line
    assert "invalid duration 'often'" in line
    assert "invalid: 1 error(s)" in result.stderr


def test_validate_json_output_is_machine_readable(write_yaml: WriteYaml) -> None:
    path = write_yaml("bad.yaml", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\n")
    result = meshlib("validate", "--format", "json", path)
    assert result.returncode == 1
    (issue,) = json.loads(result.stdout)
    assert issue["severity"] == "error"
    assert issue["resource"] == "VirtualService/default/x"
    assert issue["file"].endswith("bad.yaml")
    assert issue["field"].startswith("spec")


def test_validate_as_one_mesh_turns_cross_file_clashes_into_errors(corpus: Path) -> None:
    assert meshlib("validate", "--quiet", corpus).returncode == 0
    result = meshlib("validate", "--mesh", "--quiet", corpus)
    assert result.returncode == 1
    assert "VirtualService/default/ratings is defined twice" in result.stdout


def test_validate_a_missing_path_exits_1(tmp_path: Path) -> None:
    result = meshlib("validate", tmp_path / "nope")
    assert result.returncode == 1
    assert "no such file or folder" in result.stdout


def test_demo_static_reports_the_loaded_mesh() -> None:
    result = meshlib("demo", "--static")  # the live `meshlib demo` has its own test: tests/test_demo.py
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "snapshot version" in out
    assert "payments.shop.svc.cluster.local" in out
    assert "v1 95%, v2 5%" in out
    assert "spiffe://cluster.local/ns/shop/sa/orders" in out
    assert "STRICT" in out


def test_demo_with_a_broken_config_says_so_and_exits_1(write_yaml: WriteYaml) -> None:
    path = write_yaml(
        "bad.yaml", "apiVersion: meshlib.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: m}\nspec: {x: 1}\n"
    )
    result = meshlib("demo", "--config", path)
    assert result.returncode == 1
    assert "spec.x" in result.stderr


def test_ca_init_writes_a_root_ca_with_its_key_0600_and_never_prints_the_key(tmp_path: Path) -> None:
    folder = tmp_path / "cacerts"
    result = meshlib("ca", "init", folder, "--trust-domain", "example.org", "--ttl", "8760h")
    assert result.returncode == 0, result.stderr
    names = ["ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"]
    for name in names:
        assert f"wrote {folder / name}" in result.stdout
    assert "trust domain example.org" in result.stdout
    assert "valid until " in result.stdout
    assert "PRIVATE KEY" not in result.stdout + result.stderr
    assert (folder / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    assert folder.stat().st_mode & 0o777 == 0o700
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    text = subprocess.run(
        [openssl, "x509", "-in", str(folder / "ca-cert.pem"), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "CA:TRUE" in text
    assert "O = example.org, CN = meshlib root CA" in text


def test_ca_init_refuses_to_replace_a_ca_without_force(tmp_path: Path) -> None:
    assert meshlib("ca", "init", tmp_path).returncode == 0
    before = (tmp_path / "ca-key.pem").read_bytes()
    result = meshlib("ca", "init", tmp_path)
    assert result.returncode == 1
    assert "a CA is already there; pass --force" in result.stderr
    assert (tmp_path / "ca-key.pem").read_bytes() == before
    assert meshlib("ca", "init", "--force", tmp_path).returncode == 0
    assert (tmp_path / "ca-key.pem").read_bytes() != before
    assert (tmp_path / "ca-key.pem").stat().st_mode & 0o777 == 0o600


def test_ca_init_makes_an_intermediate_under_a_given_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert meshlib("ca", "init", root).returncode == 0
    inter = tmp_path / "intermediate"
    result = meshlib("ca", "init", inter, "--root-cert", root / "ca-cert.pem", "--root-key", root / "ca-key.pem")
    assert result.returncode == 0, result.stderr
    assert "intermediate CA under" in result.stdout
    assert (inter / "root-cert.pem").read_bytes() == (root / "ca-cert.pem").read_bytes()
    chain = (inter / "cert-chain.pem").read_bytes()
    assert chain == (inter / "ca-cert.pem").read_bytes() + (root / "ca-cert.pem").read_bytes()
    assert (inter / "ca-key.pem").read_bytes() != (root / "ca-key.pem").read_bytes()


def test_ca_init_with_bad_root_files_exits_1_naming_the_problem(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    missing = meshlib(
        "ca", "init", tmp_path / "a", "--root-cert", tmp_path / "nope.pem", "--root-key", tmp_path / "junk.pem"
    )
    assert missing.returncode == 1
    assert f"{tmp_path / 'nope.pem'}: no such file" in missing.stderr
    junk = meshlib(
        "ca", "init", tmp_path / "b", "--root-cert", tmp_path / "junk.pem", "--root-key", tmp_path / "junk.pem"
    )
    assert junk.returncode == 1
    assert "the root certificate: not a PEM certificate" in junk.stderr
    alone = meshlib("ca", "init", tmp_path / "c", "--root-cert", tmp_path / "junk.pem")
    assert alone.returncode == 1
    assert "--root-cert and --root-key go together" in alone.stderr
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()
