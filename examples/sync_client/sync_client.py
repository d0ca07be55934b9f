"""The mesh in plain synchronous code: ``mesh.client()``, and ``meshlib.MeshTransport`` in your own httpx.Client.

Run it from the repository root (with the venv active)::

    python examples/sync_client/sync_client.py

No asyncio anywhere: two ``inventory`` instances are stdlib ``http.server`` servers in
threads (one fails every third request with 503), the mesh's policy is
``mesh/inventory.yaml`` plus the ServiceEntry this script writes once the servers have
ports, and every call is an ordinary blocking httpx call.
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

import meshlib

HERE = Path(__file__).resolve().parent

SERVICE_ENTRIES = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: inventory, namespace: default}}
spec:
  hosts: [inventory]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {a}}}}}
  - {{address: 127.0.0.1, ports: {{http: {b}}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: warehouse, namespace: default}}
spec:
  hosts: [warehouse]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {dead}}}}}  # nothing listens there
"""


class Inventory(ThreadingHTTPServer):
    """One instance: answers JSON naming itself; with ``fail_every`` it answers 503 to every n-th request."""

    def __init__(self, name: str, fail_every: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.name, self.fail_every = name, fail_every
        self.answered: Counter[int] = Counter()
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class Handler(BaseHTTPRequestHandler):
    server: Inventory

    def do_GET(self) -> None:
        server = self.server
        with server.lock:
            n = sum(server.answered.values()) + 1
            status = 503 if server.fail_every and n % server.fail_every == 0 else 200
            server.answered[status] += 1
        body = json.dumps({"instance": server.name, "path": self.path, "user-agent": self.headers["user-agent"]})
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


def dead_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    a, b = Inventory("inventory-a"), Inventory("inventory-b", fail_every=3)
    with tempfile.TemporaryDirectory() as tmp:
        entries = Path(tmp) / "endpoints.yaml"
        entries.write_text(SERVICE_ENTRIES.format(a=a.port, b=b.port, dead=dead_port()))
        mesh = meshlib.Mesh.from_files(HERE / "mesh", entries, workload="shop", seed=3)
    print(f"inventory-a on 127.0.0.1:{a.port}, inventory-b on 127.0.0.1:{b.port} (fails every 3rd request)")

    # 1. mesh.client(): an httpx.Client whose every call goes through the mesh.
    with mesh.client() as client:
        statuses = Counter(client.get(f"http://inventory/items/{i}").status_code for i in range(30))
    print(f"1. mesh.client(): 30 x GET http://inventory/items/N -> {dict(statuses)}")
    print(f"   inventory-a answered {dict(a.answered)}, inventory-b {dict(b.answered)}: each 503 was retried")

    # 2. Your own httpx.Client, with its base_url, headers and event hooks: MeshTransport is its transport.
    seen: list[str] = []

    def log_response(response: httpx.Response) -> None:
        seen.append(f"{response.request.method} {response.request.url} -> {response.status_code}")

    own = httpx.Client(
        transport=meshlib.MeshTransport(mesh, inner=httpx.HTTPTransport()),
        base_url="http://inventory",
        headers={"user-agent": "shop-sync/1.0"},
        event_hooks={"response": [log_response]},
        timeout=5,
    )
    with own:
        answer = own.get("/items/42").json()
        own.get("/items/43")
    print("2. your own httpx.Client(transport=meshlib.MeshTransport(mesh, inner=httpx.HTTPTransport()), ...):")
    print(f"   event hook saw: {'; '.join(seen)}")
    print(f"   {answer['instance']} got user-agent {answer['user-agent']!r} from the client's own headers")

    # 3. Failures are httpx exceptions: code that knows nothing of the mesh still catches them.
    with mesh.client() as client:
        try:
            client.get("http://warehouse/stock")
        except httpx.HTTPError as exc:
            flag = getattr(exc, "response_flag", None)
            print(f"3. GET http://warehouse/stock (nothing listens): caught httpx.HTTPError: {type(exc).__name__}")
            print(f"   response flag {flag}: {exc}")
    mesh.close()
    for server in (a, b):
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
