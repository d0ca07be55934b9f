"""Route with Istio's own bookinfo YAML, unchanged: the reviews 80/20 split, measured.

Run it from the repository root (with the venv active)::

    meshlib validate examples/istio_yaml/mesh/
    python examples/istio_yaml/route.py

``mesh/destination-rule-all.yaml`` and ``mesh/virtual-service-reviews-80-20.yaml`` are
copied byte for byte from istio/istio's ``samples/bookinfo/networking/``;
``mesh/service-entry.yaml`` says where the reviews versions run here. This script starts
one small server per endpoint of that ServiceEntry (each answers its ``version``
label), loads the folder with ``Mesh.from_files`` as ``productpage`` would, calls
``http://reviews:9080/`` and prints the split it measured.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import uvicorn
import yaml

import meshlib

HERE = Path(__file__).resolve().parent
CALLS = 1000


def reviews_app(version: str) -> Any:
    body = json.dumps({"service": "reviews", "version": version}).encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def start_endpoints() -> list[tuple[uvicorn.Server, threading.Thread]]:
    """A server for every endpoint of mesh/service-entry.yaml, on its port, answering its version."""
    entry = yaml.safe_load((HERE / "mesh" / "service-entry.yaml").read_text())
    servers = []
    for endpoint in entry["spec"]["endpoints"]:
        version, port = endpoint["labels"]["version"], endpoint["ports"]["http"]
        config = uvicorn.Config(reviews_app(version), host=endpoint["address"], port=port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            if not thread.is_alive():
                sys.exit(f"could not listen on {endpoint['address']}:{port} (in use?): edit mesh/service-entry.yaml")
            time.sleep(0.01)
        servers.append((server, thread))
        print(f"reviews {version} on {endpoint['address']}:{port}")
    return servers


async def main() -> None:
    mesh = meshlib.Mesh.from_files(HERE / "mesh", workload="productpage", seed=1)
    print(f"loaded {len(mesh.snapshot.resources)} resources from {HERE.name}/mesh/ (configuration {mesh.version})")
    answers: Counter[str] = Counter()
    async with mesh.async_client() as client:
        for _ in range(CALLS):
            r = await client.get("http://reviews:9080/reviews/0")
            answers[r.json()["version"]] += 1
    await mesh.aclose()
    print(f"{CALLS} calls to http://reviews:9080/ (the VirtualService says v1 80, v2 20):")
    for version in ("v1", "v2", "v3"):
        print(f"  {version} {answers[version]:>4}  {100 * answers[version] / CALLS:5.1f} %")


if __name__ == "__main__":
    servers = start_endpoints()
    try:
        asyncio.run(main())
    finally:
        for server, thread in servers:
            server.should_exit = True
            thread.join(5)
