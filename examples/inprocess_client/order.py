"""order -> payment through the in-process mesh: retries, a timeout and a canary, from YAML alone.

Run it from the repository root (with the venv active)::

    python examples/inprocess_client/order.py

It starts three payment instances on free loopback ports (``payment.py``: two of the
stable version, one of which fails every second request, and one canary), writes
the ServiceEntry that says where they listen, loads it with the policy in
``mesh/payment.yaml`` through ``Mesh.from_files``, and calls ``http://payment/``
with ``mesh.async_client()``: plain httpx calls, the mesh does the rest.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import uvicorn
from payment import payment_app  # the script's folder is on sys.path

import meshlib

HERE = Path(__file__).resolve().parent
CHARGES = 200

# Where the instances listen is known only once they have a port: the rest of the
# policy is static, in mesh/payment.yaml.
SERVICE_ENTRY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payment, namespace: default}}
spec:
  hosts: [payment]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints:
{endpoints}
"""


class Instance:
    """One payment instance under uvicorn, in a thread, on a free loopback port."""

    def __init__(self, name: str, version: str, note: str = "", *, fail_every: int = 0) -> None:
        self.name, self.version, self.note = name, version, note
        self.app = payment_app(name, version, fail_every=fail_every)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self) -> Instance:
        self._thread.start()
        while not self._server.started:
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)

    @property
    def answered(self) -> Counter[int]:
        answered: Counter[int] = self.app.state.answered
        return answered

    def endpoint(self) -> str:
        return f"  - {{address: 127.0.0.1, ports: {{http: {self.port}}}, labels: {{version: {self.version}}}}}"


async def demonstrate(mesh: meshlib.Mesh, instances: list[Instance]) -> None:
    async with mesh.async_client(timeout=None) as client:  # timing is the policy's: no httpx timeout on top
        # 1 and 2: charges, retried over the flaky instance, split 90/10 between stable and canary.
        statuses: Counter[int] = Counter()
        served_by: Counter[str] = Counter()
        for i in range(CHARGES):
            r = await client.post("http://payment/charge", headers={"idempotency-key": f"order-{i}"})
            statuses[r.status_code] += 1
            served_by[r.json()["version"]] += 1

        attempts = sum(sum(i.answered.values()) for i in instances)
        failed = sum(i.answered[503] for i in instances)
        print(f"1. retries: {CHARGES} charges (POST /charge with an Idempotency-Key)")
        print(f"   order got: {', '.join(f'{n} x {s}' for s, n in sorted(statuses.items()))}")
        print(f"   payment answered {attempts} attempts:")
        for i in instances:
            print(f"     {i.name:<5} {i.answered[200]:>3} x 200, {i.answered[503]:>3} x 503  {i.note}".rstrip())
        print(f"   {failed} attempts failed with 503 and were retried on another instance: order saw none of them")

        canary = served_by["v2"]
        print("2. canary: the VirtualService splits charges 90/10 between the subsets stable (v1) and canary (v2)")
        print(f"   measured: {served_by['v1']} stable, {canary} canary ({100 * canary / CHARGES:.1f} % canary)")

        # 3: a slow call cut short by the route's timeout.
        start = time.perf_counter()
        try:
            await client.get("http://payment/statement")
            outcome = "answered (unexpected: the route's timeout did not fire)"
        except meshlib.DeadlineExceededError as exc:
            outcome = f"{type(exc).__name__} (response flag {exc.response_flag})"
        elapsed = time.perf_counter() - start
        print("3. timeout: GET /statement takes payment 1 s; the route's timeout is 300ms")
        print(f"   order got {outcome} after {elapsed:.2f} s")


async def main() -> None:
    instances = [
        Instance("v1-a", "v1").start(),
        Instance("v1-b", "v1", "(flaky: fails every 2nd request)", fail_every=2).start(),
        Instance("v2", "v2", "(the canary)").start(),
    ]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            endpoints = Path(tmp) / "payment-endpoints.yaml"
            endpoints.write_text(SERVICE_ENTRY.format(endpoints="\n".join(i.endpoint() for i in instances)))
            # One configuration from several paths: the policy folder and the endpoints file.
            mesh = meshlib.Mesh.from_files(HERE / "mesh", endpoints, workload="order", seed=7)
        print("payment instances: " + ", ".join(f"{i.name} on 127.0.0.1:{i.port}" for i in instances))
        try:
            await demonstrate(mesh, instances)
        finally:
            await mesh.aclose()
    finally:
        for i in instances:
            i.stop()


if __name__ == "__main__":
    asyncio.run(main())
