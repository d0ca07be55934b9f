"""Smoke run of the benchmarks: they run and compare every client. Speed is never asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_inprocess_benchmark_runs_every_client() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "inprocess.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for client in ("| httpx |", "| mesh / httpcore |", "| mesh |", "| httpx / fast |"):
        assert client in result.stdout
    assert "sequential" in result.stdout
    assert "concurrent" in result.stdout


def test_middleware_benchmark_runs_every_server() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "middleware.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for server in (
        "| bare app |",
        "| MeshMiddleware, no policy |",
        "| MeshMiddleware, authz |",
        "| MeshMiddleware, authz + local limit |",
    ):
        assert server in result.stdout


def test_controlplane_benchmark_pushes_to_every_subscriber() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "controlplane.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for row in (
        "| ACK after the apply returned, p50 |",
        "| ACK after the apply returned, p99 |",
        "| RSS with 100 subscribed |",
        "| RSS peak (VmHWM) |",
    ):
        assert row in result.stdout
    assert "100 of 100 ACKED, 100 on the last version" in result.stdout


def test_modes_benchmark_runs_every_mode() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "modes.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for row in (
        "| httpx → app |",
        "| in-process mesh → app |",
        "| httpx → HAProxy → app |",
        "| httpx → sidecar → app |",
        "| httpx → sidecar → sidecar (mTLS) → app |",
        "| raw → app |",
        "| raw → HAProxy → app |",
        "| raw → sidecar → app |",
        "| raw → sidecar → sidecar (mTLS) → app |",
        "| HAProxy |",
        "| sidecar (one hop) |",
    ):
        assert row in result.stdout
    assert "| one sidecar sustains ≥ 50% of HAProxy's req/s through one hop (wrk) |" in result.stdout
    assert "names no mutual_tls" not in result.stdout  # the sidecar pair did speak mTLS
