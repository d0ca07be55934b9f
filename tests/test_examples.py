"""The examples: the server example's policy over real mTLS, then every example run as its README says."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from _upstreams import free_port, service_entry, serving

import meshlib
from meshlib.engine import TLS_MODE_LABEL

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "server"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ca() -> meshlib.CertificateAuthority:
    return meshlib.CertificateAuthority.create()


@pytest.fixture(params=["fastapi_app", "starlette_app"])
def orders(request: pytest.FixtureRequest, ca: meshlib.CertificateAuthority) -> Iterator[int]:
    mesh = meshlib.Mesh.from_files(EXAMPLES / "mesh.yaml", workload="orders", ca=ca)
    with serving(load(request.param).build(mesh), mesh=mesh) as port:
        yield port
    mesh.close()


def caller(name: str, port: int, ca: meshlib.CertificateAuthority) -> meshlib.Mesh:
    entry: dict[str, Any] = service_entry("orders", (f"127.0.0.1:{port}", "v1"))
    entry["spec"]["endpoints"][0]["labels"][TLS_MODE_LABEL] = "istio"
    return meshlib.Mesh.from_resources([entry], workload=name, ca=ca)


@pytest.mark.parametrize(
    ("who", "method", "path", "status"),
    [
        ("checkout", "GET", "/orders/7", 200),
        ("ratings", "GET", "/orders/7", 403),  # not an allowed caller
        ("ratings", "GET", "/health", 200),  # open to every caller
        ("checkout", "POST", "/admin/reindex", 403),  # DENY: /admin is for ops
        ("checkout", "POST", "/public/../admin/reindex", 403),  # normalised before the DENY sees it
        ("ops", "POST", "/admin/reindex", 200),
    ],
)
async def test_the_example_policy_holds(
    orders: int, ca: meshlib.CertificateAuthority, who: str, method: str, path: str, status: int
) -> None:
    mesh = caller(who, orders, ca)
    async with mesh.async_client() as client:
        response = await client.request(method, f"http://orders{path}")
    mesh.close()
    assert response.status_code == status, response.text
    if status == 403:
        assert response.text == "RBAC: access denied"
    if status == 200 and path.startswith("/orders"):
        assert response.json() == {"order": 7, "caller": f"cluster.local/ns/default/sa/{who}"}


async def test_plaintext_callers_get_only_what_no_identity_allows(orders: int) -> None:
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"http://127.0.0.1:{orders}/health")).status_code == 200
        assert (await client.get(f"http://127.0.0.1:{orders}/orders/1")).status_code == 403


# ---------------------------------------------------------------------------- every example, run as written
#
# Each example below is run the way its README says: ``python examples/.../script.py`` in a
# subprocess (``sys.executable``, from the repository root), on real loopback ports. The
# checks read what it printed.

ROOT = Path(__file__).resolve().parents[1]
ALL_EXAMPLES = ROOT / "examples"


def run_example(*args: str | Path, status: int = 0, timeout: float = 60) -> str:
    """Run ``python ARGS...`` from the repository root and check its exit status; its output (stdout, then stderr)."""
    result = subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    output = result.stdout + result.stderr
    assert result.returncode == status, f"exit status {result.returncode}, not {status}:\n{output}"
    return output


def found(pattern: str, text: str) -> re.Match[str]:
    match = re.search(pattern, text)
    assert match is not None, f"no {pattern!r} in:\n{text}"
    return match


def test_every_example_has_a_readme_and_is_in_the_index() -> None:
    index = (ALL_EXAMPLES / "README.md").read_text()
    folders = sorted(p for p in ALL_EXAMPLES.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    assert {p.name for p in folders} >= {
        "inprocess_client",
        "server",
        "sidecar_app",
        "canary_rollout",
        "istio_yaml",
        "global_rate_limit",
        "sync_client",
    }
    for folder in folders:
        assert f"]({folder.name}/)" in index, f"examples/README.md does not list {folder.name}/"
        assert (folder / "README.md").is_file(), f"{folder.name}/ has no README.md"
    readmes = [ALL_EXAMPLES / "README.md", *(folder / "README.md" for folder in folders)]
    for readme in readmes:  # every script a README tells you to run is there
        for script in re.findall(r"python (examples/\S+\.py)", readme.read_text()):
            assert (ROOT / script).is_file(), f"{readme.relative_to(ROOT)} runs {script}, which does not exist"


def test_inprocess_client() -> None:
    out = run_example("examples/inprocess_client/order.py")
    assert "order got: 200 x 200\n" in out  # every charge succeeded...
    assert int(found(r"v1-b\s+\d+ x 200,\s+(\d+) x 503", out)[1]) > 0  # ...though the flaky instance failed some
    canary = int(found(r"measured: (\d+) stable, (\d+) canary", out)[2])
    assert 8 <= canary <= 35, out  # 10 % of 200
    elapsed = float(found(r"order got DeadlineExceededError \(response flag UT\) after (\d+\.\d+) s", out)[1])
    assert 0.25 <= elapsed < 0.9, out  # the route's 300ms, not the upstream's 1 s


@pytest.mark.parametrize("app", ["fastapi_app", "starlette_app"])
def test_server_example_runs_as_written(app: str, tmp_path: Path) -> None:
    run_example("-m", "meshlib", "ca", "init", tmp_path / "ca")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, f"examples/server/{app}.py", "--ca", str(tmp_path / "ca"), "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        limit = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            assert server.poll() is None, f"{app} exited with {server.returncode}"
            assert time.monotonic() < limit, f"{app} did not listen"
            time.sleep(0.05)
        out = run_example("examples/server/call.py", "--ca", tmp_path / "ca", "--port", str(port))
    finally:
        server.terminate()
        server.wait(10)
    assert 'checkout  GET  /orders/7       -> 200 {"order":7,"caller":"cluster.local/ns/default/sa/checkout"}' in out
    assert "ratings   GET  /orders/7       -> 403 RBAC: access denied" in out
    assert 'ratings   GET  /health         -> 200 {"status":"ok"}' in out
    assert "checkout  POST /admin/reindex  -> 403 RBAC: access denied" in out
    assert 'ops       POST /admin/reindex  -> 200 {"status":"reindexing"}' in out


def test_sidecar_app() -> None:
    out = run_example("examples/sidecar_app/run.py")
    assert "frontend called http://backend/hello -> 200" in out
    # The identity the backend's sidecar verified over mTLS, passed to an app that has no meshlib.
    assert "backend saw the caller: spiffe://cluster.local/ns/default/sa/frontend\n" in out
    assert ";URI=spiffe://cluster.local/ns/default/sa/frontend" in out
    assert "meshlib imported by the apps: frontend False, backend False" in out
    assert "-> 400 meshlib: this port requires mutual TLS (PeerAuthentication STRICT)" in out


def canary_steps(out: str) -> list[tuple[int, int, int]]:
    """(percent set, calls measured, canary calls) for each step of the rollout's output."""
    steps = re.findall(r"canary at (\d+) %.*\n  measured over (\d+) calls: v1 \d+, v2 (\d+)", out)
    return [(int(p), int(n), int(c)) for p, n, c in steps]


def test_canary_rollout_to_100() -> None:
    out = run_example("examples/canary_rollout/rollout.py")
    steps = canary_steps(out)
    assert [p for p, _, _ in steps] == [10, 50, 100], out
    for percent, calls, canary in steps:
        assert abs(100 * canary / calls - percent) <= 10, out
    assert re.search(r"version 4: canary at 100 %; ACKed by 1 data plane\(s\) in \d+ ms", out), out
    assert "rolled out: v2 takes 100 % of the traffic (version 4)" in out


def test_canary_rollout_rolls_back_on_a_running_control_plane(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "cp-state"
    plane = subprocess.Popen(
        [sys.executable, "-m", "meshlib", "control-plane", "--state-dir", str(state), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        limit = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1, trust_env=False).status_code == 200:
                    break
            assert plane.poll() is None, "the control plane exited"
            assert time.monotonic() < limit, "the control plane did not answer /healthz"
            time.sleep(0.05)
        args = ["--control-plane", f"http://127.0.0.1:{port}", "--admin-token-file", str(state / "admin-token")]
        out = run_example("examples/canary_rollout/rollout.py", "--canary-error-rate", "0.3", *args, status=1)
        history = httpx.get(
            f"http://127.0.0.1:{port}/v1/history",
            headers={"authorization": f"Bearer {(state / 'admin-token').read_text().strip()}"},
            trust_env=False,
        ).json()
    finally:
        plane.terminate()
        plane.wait(10)
    assert canary_steps(out)[0][0] == 10
    assert found(r"canary errors (\d+)/(\d+)", out)[1] != "0"
    assert "the canary fails too often: rolling back to version 1" in out
    assert found(r"rollback to version 1; ACKed.*\n  measured over (\d+) calls: v1 (\d+), v2 (\d+)", out)[3] == "0"
    assert "rolled back: v2 takes no traffic (version 3); exit status 1" in out
    assert "rollback to 1" in json.dumps(history)  # the control plane's own record of it


def test_istio_yaml() -> None:
    for name in ("destination-rule-all.yaml", "virtual-service-reviews-80-20.yaml"):  # Istio's files, unchanged
        copy = ALL_EXAMPLES / "istio_yaml" / "mesh" / name
        assert copy.read_bytes() == (ROOT / "tests" / "fixtures" / "istio" / name).read_bytes()
    assert "valid: 0 error(s), 0 warning(s)" in run_example("-m", "meshlib", "validate", "examples/istio_yaml/mesh/")
    out = run_example("examples/istio_yaml/route.py")
    calls = int(found(r"(\d+) calls to http://reviews:9080/", out)[1])
    share = {v: int(found(rf"  {v}\s+(\d+)", out)[1]) / calls for v in ("v1", "v2", "v3")}
    assert abs(share["v1"] - 0.8) < 0.05, out
    assert abs(share["v2"] - 0.2) < 0.05, out
    assert share["v3"] == 0, out


def test_global_rate_limit() -> None:
    if not os.environ.get("REDIS_URL") and shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (python3 dev.py setup installs it)")
    out = run_example("examples/global_rate_limit/run.py")
    # 20 a minute for the tenant, whichever replica answers: the two replicas share one count in Redis.
    assert "replica a: 10 x 200, 10 x 429" in out
    assert "replica b: 10 x 200, 10 x 429" in out
    assert "together: 20 x 200" in out
    assert "a refusal: 429 'meshlib: rate limited'" in out


def test_sync_client() -> None:
    out = run_example("examples/sync_client/sync_client.py")
    assert "30 x GET http://inventory/items/N -> {200: 30}" in out
    assert int(found(r"inventory-b \{200: \d+, 503: (\d+)\}", out)[1]) > 0
    assert "event hook saw: GET http://inventory/items/42 -> 200; GET http://inventory/items/43 -> 200" in out
    assert "got user-agent 'shop-sync/1.0' from the client's own headers" in out
    assert "caught httpx.HTTPError: RetriesExhaustedError" in out
    assert "response flag URX" in out
