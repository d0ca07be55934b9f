"""Two apps with no meshlib import, each behind ``meshlib sidecar``, and one call between them.

Run it from the repository root (with the venv active)::

    python examples/sidecar_app/run.py

It makes a CA (``meshlib ca init``), starts ``backend.py`` and ``frontend.py`` (plain
ASGI and Starlette apps) and a sidecar beside each, then makes one call:

    you -> frontend app --HTTP_PROXY--> frontend's sidecar --mTLS--> backend's sidecar -> backend app

and prints what the backend saw: the frontend's SPIFFE identity, verified by its
sidecar. Every process it started is stopped before it exits. Ports are free
loopback ports picked at start.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")

# Where the backend is reached: its sidecar's inbound port, which speaks the mesh's mTLS
# (the tlsMode label turns on auto mTLS for callers) as the backend's identity.
SERVICE_ENTRY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend, namespace: default}}
spec:
  hosts: [backend]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints:
  - address: 127.0.0.1
    ports: {{http: {port}}}
    labels: {{security.istio.io/tlsMode: istio}}
    serviceAccount: backend
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Process:
    """A child process whose output goes to a log file; ``wait_for`` a line in it."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_for(self, pattern: str, timeout: float = 20.0) -> None:
        limit = time.monotonic() + timeout
        while not re.search(pattern, self.log.read_text(errors="replace")):
            if self.process.poll() is not None or time.monotonic() > limit:
                raise RuntimeError(f"{self.name} did not start:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # a sidecar drains on SIGTERM (--drain-timeout)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def sidecar(workload: str, app_port: int, ca: Path, config: list[Path], ports: dict[str, int]) -> list[str]:
    """The command line of ``meshlib sidecar`` for ``workload``, in front of its app on ``app_port``."""
    return [
        *(sys.executable, "-m", "meshlib", "sidecar", "--workload", workload),
        *("--config", *map(str, config)),
        *("--ca", str(ca), f"--app=127.0.0.1:{app_port}", "--drain-timeout=1"),
        *(f"--{side}=127.0.0.1:{port}" for side, port in ports.items()),  # --inbound, --outbound, --admin
    ]


def main() -> int:
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARIABLES}
    backend, frontend = free_port(), free_port()
    backend_sidecar = {side: free_port() for side in ("inbound", "outbound", "admin")}
    frontend_sidecar = {side: free_port() for side in ("inbound", "outbound", "admin")}
    proxy = f"http://127.0.0.1:{frontend_sidecar['outbound']}"  # the frontend's sidecar, outbound side
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ca = work / "ca"
        subprocess.run([sys.executable, "-m", "meshlib", "ca", "init", str(ca)], check=True, capture_output=True)
        endpoints = work / "backend-endpoints.yaml"
        endpoints.write_text(SERVICE_ENTRY.format(port=backend_sidecar["inbound"]))
        started: list[Process] = []
        try:
            app = [sys.executable, str(HERE / "backend.py"), "--port", str(backend)]
            started.append(Process("backend", app, work, env))
            command = sidecar("backend", backend, ca, [HERE / "mesh"], backend_sidecar)
            started.append(Process("backend-sidecar", command, work, env))
            command = sidecar("frontend", frontend, ca, [HERE / "mesh", endpoints], frontend_sidecar)
            started.append(Process("frontend-sidecar", command, work, env))
            app = [sys.executable, str(HERE / "frontend.py"), "--port", str(frontend)]
            started.append(Process("frontend", app, work, {**env, "HTTP_PROXY": proxy, "http_proxy": proxy}))
            for process in started:
                process.wait_for(r"listening on|meshlib sidecar ready")
            inbound = backend_sidecar["inbound"]
            print(f"backend app on 127.0.0.1:{backend}, behind its sidecar (inbound :{inbound}, mTLS)")
            print(f"frontend app on 127.0.0.1:{frontend}, HTTP_PROXY={proxy} (its sidecar)")

            with httpx.Client(trust_env=False, timeout=10) as client:
                answer = client.get(f"http://127.0.0.1:{frontend}/").json()
                seen = answer["backend"]  # what the backend app answered the frontend
                print(f"GET / on the frontend -> frontend called http://backend/hello -> {answer['backend_status']}")
                print(f"backend saw the caller: {seen['caller']}")
                print(f"  x-forwarded-client-cert: {seen['x-forwarded-client-cert']}")
                loaded = f"frontend {answer['meshlib_loaded']}, backend {seen['meshlib_loaded']}"
                print(f"meshlib imported by the apps: {loaded}")

                # The backend's sidecar takes mTLS only (PeerAuthentication STRICT): a plaintext call
                # that skips the frontend's sidecar never reaches the backend.
                try:
                    r = client.get(f"http://127.0.0.1:{backend_sidecar['inbound']}/hello")
                    plaintext = f"{r.status_code} {r.text}"
                except httpx.HTTPError as exc:
                    plaintext = f"refused ({type(exc).__name__})"
                print(f"a plaintext call straight to the backend's sidecar -> {plaintext}")
        finally:
            for process in reversed(started):
                process.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
