"""Call the example ``orders`` service as three different workloads, over mTLS, and print what each got.

With a server running (``python examples/server/fastapi_app.py``, or the Starlette one),
in a second terminal::

    python examples/server/call.py

Each caller is a ``Mesh`` with its own workload identity from the same CA; the
ServiceEntry says ``orders`` listens on 127.0.0.1:PORT and speaks the mesh's mTLS
(``security.istio.io/tlsMode: istio``), so the client originates mTLS to it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import httpx

import meshlib

HERE = Path(__file__).resolve().parent

CALLS = [
    ("checkout", "GET", "/orders/7"),
    ("ratings", "GET", "/orders/7"),
    ("ratings", "GET", "/health"),
    ("checkout", "POST", "/admin/reindex"),
    ("ops", "POST", "/admin/reindex"),
]


def orders_entry(port: int) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "orders", "namespace": "default"},
        "spec": {
            "hosts": ["orders"],
            "location": "MESH_INTERNAL",
            "resolution": "STATIC",
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
            "endpoints": [
                {
                    "address": "127.0.0.1",
                    "ports": {"http": port},
                    "labels": {"security.istio.io/tlsMode": "istio"},
                    "serviceAccount": "orders",
                }
            ],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="call the example orders service as checkout, ratings and ops")
    parser.add_argument(
        "--ca", default=HERE.parents[1] / "ca", help="the server's CA folder (default: ca/ at the root)"
    )
    parser.add_argument("--port", type=int, default=8443, help="the server's port (default %(default)s)")
    args = parser.parse_args()
    ca = meshlib.CertificateAuthority.load(args.ca)
    for who, method, path in CALLS:
        mesh = meshlib.Mesh.from_resources([orders_entry(args.port)], workload=who, ca=ca)
        with mesh.client() as client:
            try:
                r = client.request(method, f"http://orders{path}")
                answer = f"{r.status_code} {r.text}"
            except httpx.HTTPError as exc:
                answer = f"{type(exc).__name__}: {exc}"
        mesh.close()
        print(f"{who:<9} {method:<4} {path:<15} -> {answer}")


if __name__ == "__main__":
    main()
