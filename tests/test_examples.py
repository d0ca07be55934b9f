"""The example services enforce their policy over real mTLS, in FastAPI and in Starlette alike."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from _upstreams import service_entry, serving

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
