"""Roll a canary out 10 -> 50 -> 100 % through a control plane, and roll it back if it fails.

Run it from the repository root (with the venv active)::

    python examples/canary_rollout/rollout.py                          # a healthy canary: rolled out, exit 0
    python examples/canary_rollout/rollout.py --canary-error-rate 0.3  # a failing one: rolled back, exit 1

Every change goes through the control plane's admin API, as a CD job would make it:
``POST /v1/resources`` applies the VirtualService with the next weights, ``GET
/v1/dataplanes`` shows when every data plane has ACKed that version, and a client
connected with ``Mesh.connect`` then measures the split and the canary's error rate.
Above ``--max-error-rate`` it calls ``POST /v1/rollback`` to the version before the
rollout and checks that the canary gets no traffic any more.

Without ``--control-plane`` it starts its own (``meshlib control-plane`` in a
subprocess, its state in a temporary folder); the two ``reviews`` instances it rolls
between are its own too (``reviews.py``), on free loopback ports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from reviews import Reviews  # the script's folder is on sys.path

import meshlib

HOST = "reviews"
NAMESPACE = "default"


# ---------------------------------------------------------------------------- the resources


def service_and_subsets(v1_port: int, v2_port: int) -> list[dict[str, Any]]:
    """Where reviews runs (one endpoint per version) and its two subsets."""
    return [
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": HOST, "namespace": NAMESPACE},
            "spec": {
                "hosts": [HOST],
                "location": "MESH_INTERNAL",
                "resolution": "STATIC",
                "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                "endpoints": [
                    {"address": "127.0.0.1", "ports": {"http": v1_port}, "labels": {"version": "v1"}},
                    {"address": "127.0.0.1", "ports": {"http": v2_port}, "labels": {"version": "v2"}},
                ],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": HOST, "namespace": NAMESPACE},
            "spec": {"host": HOST, "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")]},
        },
    ]


def virtual_service(canary_percent: int) -> dict[str, Any]:
    """The route: ``canary_percent`` to v2, the rest to v1."""
    weights = {"v1": 100 - canary_percent, "v2": canary_percent}
    route = [{"destination": {"host": HOST, "subset": s}, "weight": w} for s, w in weights.items() if w > 0]
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": HOST, "namespace": NAMESPACE},
        "spec": {"hosts": [HOST], "http": [{"route": route}]},
    }


# ---------------------------------------------------------------------------- the control plane's admin API


class Admin:
    """``Authorization: Bearer <admin token>`` calls to the control plane."""

    def __init__(self, url: str, token: str) -> None:
        auth = {"authorization": f"Bearer {token}"}
        self.http = httpx.AsyncClient(base_url=url, headers=auth, timeout=10, trust_env=False)

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        r = await self.http.request(method, path, **kwargs)
        if r.status_code >= 300:
            raise SystemExit(f"{method} {path}: {r.status_code} {r.text}")
        return r.json()

    async def apply(self, resources: list[dict[str, Any]]) -> int:
        return int((await self.call("POST", "/v1/resources", json=resources))["version"])

    async def rollback(self, version: int) -> int:
        return int((await self.call("POST", "/v1/rollback", json={"version": version}))["version"])

    async def token(self, service_account: str) -> str:
        body = {"namespace": NAMESPACE, "service_account": service_account}
        return str((await self.call("POST", "/v1/tokens", json=body))["token"])

    async def wait_for_acks(self, version: int, timeout: float = 10.0) -> str:
        """Until every connected data plane ACKed ``version`` (or a later one); a NACK or the timeout stops it."""
        start = time.monotonic()
        while True:
            planes = [
                p for p in (await self.call("GET", "/v1/dataplanes"))["dataplanes"] if p["state"] != "DISCONNECTED"
            ]
            nacked = [p for p in planes if p["state"] == "NACKED"]
            if nacked:
                raise SystemExit(f"version {version} was NACKed: {nacked[0]['last_nack']}")
            if planes and all((p["acked_version"] or 0) >= version for p in planes):
                return f"ACKed by {len(planes)} data plane(s) in {1000 * (time.monotonic() - start):.0f} ms"
            if time.monotonic() - start > timeout:
                lagging = [p["node"] for p in planes if (p["acked_version"] or 0) < version]
                raise SystemExit(f"version {version} not ACKed after {timeout:g} s by {lagging or 'any data plane'}")
            await asyncio.sleep(0.02)


@contextlib.contextmanager
def own_control_plane(state_dir: Path) -> Iterator[tuple[str, str]]:
    """``meshlib control-plane`` on a free loopback port: (url, admin token) once it answers /healthz."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "meshlib", "control-plane", "--state-dir", str(state_dir)]
    log = state_dir.parent / "control-plane.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([*command, "--listen", f"127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    try:
        limit = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1, trust_env=False).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > limit:
                raise SystemExit(f"the control plane did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield url, (state_dir / "admin-token").read_text().strip()
    finally:
        process.terminate()
        process.wait(10)


# ---------------------------------------------------------------------------- the rollout


async def measure(client: httpx.AsyncClient, calls: int) -> tuple[Counter[str], Counter[str]]:
    """``calls`` requests to reviews: how many each version answered, and how many of those were errors."""
    served: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for _ in range(calls):
        r = await client.get(f"http://{HOST}/reviews/1")
        version = r.json()["version"]
        served[version] += 1
        if r.status_code >= 500:
            errors[version] += 1
    return served, errors


async def rollout(url: str, admin_token: str, args: argparse.Namespace, v1: Reviews, v2: Reviews, work: Path) -> int:
    admin = Admin(url, admin_token)
    baseline = await admin.apply([*service_and_subsets(v1.port, v2.port), virtual_service(0)])
    # The client whose traffic is measured: a data plane like any other, following the control plane.
    mesh = await meshlib.Mesh.connect(url, workload="order", token=await admin.token("order"), cache_dir=work, seed=1)
    try:
        print(f"version {baseline}: baseline, 100 % to v1; {await admin.wait_for_acks(baseline)}")
        async with mesh.async_client() as client:
            for percent in args.steps:
                version = await admin.apply([virtual_service(percent)])
                print(f"version {version}: canary at {percent} %; {await admin.wait_for_acks(version)}")
                served, errors = await measure(client, args.calls)
                canary, failed = served["v2"], errors["v2"]
                rate = failed / canary if canary else 0.0
                print(
                    f"  measured over {args.calls} calls: v1 {served['v1']}, v2 {canary} "
                    f"({100 * canary / args.calls:.1f} % canary); canary errors {failed}/{canary} "
                    f"({100 * rate:.1f} %, limit {100 * args.max_error_rate:.1f} %)"
                )
                if rate > args.max_error_rate:
                    print(f"  the canary fails too often: rolling back to version {baseline}")
                    rolled = await admin.rollback(baseline)
                    print(f"version {rolled}: rollback to version {baseline}; {await admin.wait_for_acks(rolled)}")
                    served, _ = await measure(client, args.calls)
                    print(f"  measured over {args.calls} calls: v1 {served['v1']}, v2 {served['v2']}")
                    print(f"rolled back: v2 takes no traffic (version {rolled}); exit status 1")
                    return 1
        print(f"rolled out: v2 takes 100 % of the traffic (version {version})")
        return 0
    finally:
        await mesh.aclose()
        await admin.http.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description="a canary rollout through the control plane's admin API")
    parser.add_argument("--control-plane", metavar="URL", help="a running control plane (default: start one)")
    parser.add_argument("--admin-token-file", type=Path, help="with --control-plane: its admin token")
    parser.add_argument("--steps", default="10,50,100", help="canary percentages, in order (default %(default)s)")
    parser.add_argument("--calls", type=int, default=200, help="calls measured at each step (default %(default)s)")
    parser.add_argument("--max-error-rate", type=float, default=0.05, help="roll back above it (default %(default)s)")
    parser.add_argument("--canary-error-rate", type=float, default=0.0, help="how often v2 answers 500 (default 0)")
    args = parser.parse_args()
    args.steps = [int(p) for p in args.steps.split(",")]
    if args.control_plane and not args.admin_token_file:
        parser.error("--control-plane needs --admin-token-file")

    v1, v2 = Reviews("v1").start(), Reviews("v2", error_rate=args.canary_error_rate).start()
    print(f"reviews v1 on 127.0.0.1:{v1.port}; v2, the canary, on 127.0.0.1:{v2.port}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            if args.control_plane:
                token = args.admin_token_file.read_text().strip()
                return asyncio.run(rollout(args.control_plane, token, args, v1, v2, work))
            with own_control_plane(work / "control-plane") as (url, token):
                print(f"control plane {url} (started here)")
                return asyncio.run(rollout(url, token, args, v1, v2, work))
    finally:
        v1.stop()
        v2.stop()


if __name__ == "__main__":
    sys.exit(main())
