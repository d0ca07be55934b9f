"""No secret leaks: after a full flow (tokens made, certificates issued, traffic), grep everything a user sees.

The flow: a control plane (file store) issues two bootstrap tokens; an in-process
mesh and a sidecar process (the CLI) connect with them and get certificates; a
request goes through the sidecar; a bad token is refused. Then every log record
(caplog at DEBUG), the sidecar's output, its ``/config`` and ``/metrics``, the control
plane's API answers, the error message of the refused token and every file of the
control plane's store are searched for a private-key PEM and for every token value.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest

import meshlib
from meshlib import ControlPlaneAuthError
from tests._upstreams import Upstream, service_entry, upstreams
from tests.control._cp import ADMIN_TOKEN, running_control_plane
from tests.reliability._chaos import record
from tests.sidecar._sidecar import sidecar_process

MARKERS = ("PRIVATE KEY", "-----BEGIN EC", "-----BEGIN RSA")


def test_no_private_key_or_token_in_logs_errors_admin_pages_or_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with upstreams(Upstream("api")) as (api,), running_control_plane(tmp_path, [service_entry("api", api)]) as cp:
        with caplog.at_level(logging.DEBUG):
            mesh_token = cp.token("default", "order")
            sidecar_token = cp.token("default", "front")
            mesh = asyncio.run(
                meshlib.Mesh.connect(cp.url, workload="order", token=mesh_token, cache_dir=tmp_path / "cache-order")
            )
            try:
                assert mesh.certificates is not None
                key_pem = mesh.certificates.key_pem if hasattr(mesh.certificates, "key_pem") else None
                with mesh.client() as client:
                    assert client.get("http://api/").status_code == 200
            finally:
                mesh.close()
            with pytest.raises(ControlPlaneAuthError) as refused:
                asyncio.run(
                    meshlib.Mesh.connect(
                        cp.url, workload="order", token="mlt_not-a-real-token", cache_dir=tmp_path / "none", timeout=2
                    )
                )
            with sidecar_process(
                "--workload", "front", "--control-plane", cp.url, "--token", sidecar_token,
                "--cache-dir", str(tmp_path / "cache-front"), "--app", api.address,
            ) as sidecar:  # fmt: skip
                with sidecar.client() as client:
                    assert client.get("http://api/").status_code == 200
                pages = {path: sidecar.admin(path).text for path in ("/config", "/metrics", "/ready")}
                api_answers = {path: str(cp.get(path)) for path in ("/v1/resources", "/v1/dataplanes")}
                sidecar.terminate()
                sidecar.wait()
                output = sidecar.output
        store_files = {
            str(p): p.read_bytes().decode("latin-1") for p in (tmp_path / "control-plane").rglob("*") if p.is_file()
        }
        sources = {
            "logs": caplog.text,
            "sidecar output": output,
            "refused-token error": str(refused.value),
            **{f"sidecar {k}": v for k, v in pages.items()},
            **{f"control plane {k}": v for k, v in api_answers.items()},
            **{f"store {k}": v for k, v in store_files.items()},
        }
        secrets = [mesh_token, sidecar_token, ADMIN_TOKEN, "mlt_not-a-real-token"]
        if isinstance(key_pem, bytes | str) and key_pem:
            secrets.append(key_pem.decode() if isinstance(key_pem, bytes) else key_pem)
        leaks = [(name, what) for name, text in sources.items() for what in (*MARKERS, *secrets) if what in text]
        record("secrets grep", sources=len(sources), store_files=len(store_files), leaks=len(leaks))
        assert leaks == []
        assert "/config" in pages
        assert "certificate" in pages["/config"].lower()


def test_the_admin_api_refuses_a_caller_without_credentials(tmp_path: Path) -> None:
    with running_control_plane(tmp_path) as cp:
        for method, path in (("GET", "/v1/resources"), ("POST", "/v1/resources"), ("POST", "/v1/tokens")):
            r = httpx.request(method, f"{cp.url}{path}", content=b"[]", timeout=5)
            assert r.status_code in (401, 403), (path, r.status_code)
