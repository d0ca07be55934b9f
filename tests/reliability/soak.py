"""Soak (``nox -s reliability``, not CI): a sidecar under wrk and an in-process client in a Python loop.

    python tests/reliability/soak.py [SECONDS]     (default 60)

The sidecar is the CLI in a process of its own (``meshlib sidecar --config``) in
front of a FaultServer upstream with no faults; wrk drives its outbound listener as a
plain HTTP proxy would be driven (absolute-form is not needed: ``Host: soak``). The
in-process client is ``Mesh.client`` in a loop against the same upstream. Each prints
requests, errors, RSS and open fds at the start (after a warm-up) and at the end, and
fails (exit 1) on any error, RSS growth >= 10 % or fd growth.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import yaml  # noqa: E402

import meshlib  # noqa: E402
from tests._upstreams import service_entry  # noqa: E402
from tests.reliability._chaos import FaultServer, record  # noqa: E402
from tests.sidecar._sidecar import SidecarProcess  # noqa: E402


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


QUIESCE = 6.0
"""Seconds to wait before counting open files: longer than the transport's idle keep-alive."""


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def soak_sidecar(upstream: FaultServer, seconds: float) -> bool:
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk not found: skipping the sidecar soak")
        return False
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "mesh.yaml"
        config.write_text(yaml.safe_dump(service_entry("soak", (upstream.address, "v1"))))
        sidecar = SidecarProcess("--workload", "soak-client", "--config", str(config), "--app", upstream.address)
        try:
            url = f"http://127.0.0.1:{sidecar.ports['outbound']}/"

            def run(duration: float) -> tuple[int, int]:
                out = subprocess.run(
                    [wrk, "-t2", "-c32", f"-d{max(1, int(duration))}s", "-H", "Host: soak", url],
                    capture_output=True, text=True, check=True,
                ).stdout  # fmt: skip
                requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
                errors = 0
                if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
                    errors += int(m.group(1))
                if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
                    errors += sum(int(g) for g in m.groups())
                return requests, errors

            run(5)  # warm-up: pools, caches, allocator
            # Count files only once idle upstream connections expired (5 s keep-alive): right after a
            # wrk run the pool still holds a varying number of them, which says nothing about leaks.
            time.sleep(QUIESCE)
            rss0, fd0 = rss_kb(sidecar.pid), fds(sidecar.pid)
            requests, errors = run(seconds)
            time.sleep(QUIESCE)
            rss1, fd1 = rss_kb(sidecar.pid), fds(sidecar.pid)
        finally:
            sidecar.kill()
    growth = (rss1 - rss0) / rss0 * 100
    record(
        "soak sidecar (wrk -t2 -c32)",
        seconds=seconds, requests=requests, errors=errors, rps=round(requests / seconds),
        rss_kb=[rss0, rss1], rss_growth_percent=round(growth, 1), fds=[fd0, fd1],
    )  # fmt: skip
    return errors == 0 and growth < 10 and fd1 <= fd0


def soak_in_process(upstream: FaultServer, seconds: float) -> bool:
    mesh = meshlib.Mesh.from_resources([service_entry("soak", (upstream.address, "v1"))], workload="soak-client")
    pid = os.getpid()
    requests = errors = 0
    try:
        with mesh.client(timeout=5) as client:

            def run(duration: float) -> None:
                nonlocal requests, errors
                end = time.monotonic() + duration
                while time.monotonic() < end:
                    try:
                        if client.get("http://soak/").status_code != 200:
                            errors += 1
                    except httpx.HTTPError:
                        errors += 1
                    requests += 1

            run(5)
            requests = errors = 0
            rss0, fd0 = rss_kb(pid), fds(pid)
            run(seconds)
            rss1, fd1 = rss_kb(pid), fds(pid)
    finally:
        mesh.close()
    growth = (rss1 - rss0) / rss0 * 100
    record(
        "soak in-process (1 thread loop)",
        seconds=seconds, requests=requests, errors=errors, rps=round(requests / seconds),
        rss_kb=[rss0, rss1], rss_growth_percent=round(growth, 1), fds=[fd0, fd1],
    )  # fmt: skip
    return errors == 0 and growth < 10 and fd1 <= fd0


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    upstream = FaultServer("soak")
    try:
        ok = soak_sidecar(upstream, seconds)
        ok = soak_in_process(upstream, seconds) and ok
    finally:
        upstream.close()
    print(json.dumps({"ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
