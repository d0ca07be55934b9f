"""``meshlib control-plane``, ``meshlib apply`` and ``meshlib token`` as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests._upstreams import free_port

CORPUS = Path(__file__).parent.parent / "fixtures" / "istio"
MESHLIB = [sys.executable, "-m", "meshlib"]


def meshlib(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MESHLIB, *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = free_port()
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [
            *MESHLIB,
            "control-plane",
            "--state-dir",
            str(state),
            "--listen",
            f"127.0.0.1:{port}",
            "--config",
            str(CORPUS / "destination-rule-all.yaml"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    limit = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < limit, "the control plane did not come up"
        time.sleep(0.05)
    try:
        yield url, state
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, out


def test_the_control_plane_serves_its_config_files_and_takes_changes(control_plane: tuple[str, Path]) -> None:
    url, state = control_plane
    token_file = state / "admin-token"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert (state / "ca" / "ca-key.pem").exists(), "a CA was made for the mesh"
    assert httpx.get(f"{url}/healthz").json()["version"] == 1
    applied = meshlib(
        "apply",
        str(CORPUS / "virtual-service-reviews-80-20.yaml"),
        "--control-plane",
        url,
        "--admin-token-file",
        str(token_file),
    )
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.strip() == "version 2"
    again = meshlib(
        "apply",
        str(CORPUS / "virtual-service-reviews-80-20.yaml"),
        "--control-plane",
        url,
        "--admin-token-file",
        str(token_file),
    )
    assert again.stdout.strip() == "version 2 (unchanged)"
    token = meshlib(
        "token", "--service-account", "reviews", "--control-plane", url, "--admin-token-file", str(token_file)
    )
    assert token.returncode == 0
    assert token.stdout.startswith("mlt_")
    metrics = httpx.get(f"{url}/metrics").text
    assert "meshlib_controlplane_config_version 2.0" in metrics


def test_apply_refuses_a_bad_file_and_changes_nothing(control_plane: tuple[str, Path], tmp_path: Path) -> None:
    url, state = control_plane
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\n"
        "spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v9}}]}]}\n"
    )
    result = meshlib("apply", str(bad), "--control-plane", url, "--admin-token-file", str(state / "admin-token"))
    assert result.returncode == 1
    assert "VirtualService/default/reviews" in result.stderr
    assert "subset" in result.stderr
    assert httpx.get(f"{url}/healthz").json()["version"] == 1
    no_token = meshlib("apply", str(bad), "--control-plane", url, "--admin-token", "mlt_wrong")
    assert no_token.returncode == 1
    assert "token" in no_token.stderr


def test_a_bad_config_file_stops_the_control_plane_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [unclosed\n")
    result = meshlib(
        "control-plane",
        "--state-dir",
        str(tmp_path / "s"),
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--config",
        str(bad),
    )
    assert result.returncode == 1
    assert "bad.yaml" in result.stdout + result.stderr
    assert "line" in result.stdout + result.stderr


def test_an_admin_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("mlt_x\n")
    os.chmod(token, 0o644)
    result = meshlib(
        "control-plane",
        "--state-dir",
        str(tmp_path / "s"),
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--admin-token-file",
        str(token),
    )
    assert result.returncode == 1
    assert "chmod 600" in result.stdout + result.stderr
