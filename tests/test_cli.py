"""The ``meshlib`` command line as a user runs it: a real process, its output and exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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


def test_demo_reports_the_loaded_mesh() -> None:
    result = meshlib("demo")
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
