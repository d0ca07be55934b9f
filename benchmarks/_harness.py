"""What every benchmark here shares: a uvicorn upstream in its own process, the load
loops, the statistics, and writing results into docs/benchmarks.md.

Benchmarks measure *ratios side by side in one run* (the machine's speed changes
from run to run; the ratio of two clients measured together is what is stable).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
PAYLOAD = b'{"ok":true}'

Send = Callable[[], Awaitable[Any]]


async def app(scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
    """The upstream: a tiny JSON answer, so the client and mesh costs dominate."""
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(PAYLOAD))],
        }
    )
    await send({"type": "http.response.body", "body": PAYLOAD})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


PEER_AUTHENTICATION_STRICT: dict[str, Any] = {
    "apiVersion": "security.istio.io/v1",
    "kind": "PeerAuthentication",
    "metadata": {"name": "default", "namespace": "default"},
    "spec": {"mtls": {"mode": "STRICT"}},
}

MTLS_WORKLOAD = "bench"
"""The mTLS upstream's workload (its certificate names spiffe://cluster.local/ns/default/sa/bench)."""


def serve_mtls(port: int, ca_dir: str) -> None:
    """``app`` through ``meshlib.MeshServer`` (PeerAuthentication STRICT), its certificate from the CA in ``ca_dir``.

    Same uvicorn options as the plaintext upstream: httptools, uvloop, no access log.
    """
    import meshlib

    ca = meshlib.CertificateAuthority.load(ca_dir)
    mesh = meshlib.Mesh.from_resources([PEER_AUTHENTICATION_STRICT], workload=meshlib.Workload(MTLS_WORKLOAD), ca=ca)
    server = meshlib.MeshServer(
        app,
        mesh=mesh,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="error",
    )
    server.run()


def app_command(port: int, ca_dir: Path | None = None) -> list[str]:
    """``upstream``'s server process: ``app`` under uvicorn, or through MeshServer with ``ca_dir``."""
    if ca_dir is None:
        code = (
            f"import uvicorn, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks._harness import app; "
            f"uvicorn.run(app, host='127.0.0.1', port={port}, loop='uvloop', http='httptools', access_log=False, "
            "log_level='error')"
        )
    else:
        code = (
            f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks._harness import serve_mtls; "
            f"serve_mtls({port}, {str(ca_dir)!r})"
        )
    return [sys.executable, "-c", code]


@contextlib.contextmanager
def serving(argv: list[str], port: int, timeout: float = 15.0, **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` and wait until it accepts connections on loopback ``port``; terminate it at the end."""
    proc = subprocess.Popen(argv, **popen)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{Path(argv[0]).name} exited with status {proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{Path(argv[0]).name} did not listen on port {port}") from None
                time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def upstream(ca_dir: Path | None = None) -> Iterator[int]:
    """A uvicorn (httptools, uvloop, no access log) server process on a free loopback port.

    With ``ca_dir`` (a folder ``CertificateAuthority.save`` wrote) it serves through
    ``meshlib.MeshServer`` instead: mTLS only (STRICT), with a certificate from that CA.
    """
    port = free_port()
    with serving(app_command(port, ca_dir), port):
        yield port


def summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    latencies.sort()
    return {
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1e6,
        "rps": len(latencies) / elapsed,
    }


async def sequential(send: Send, n: int) -> dict[str, float]:
    latencies = []
    clock = time.perf_counter
    start = clock()
    for _ in range(n):
        t0 = clock()
        await send()
        latencies.append(clock() - t0)
    return summary(latencies, clock() - start)


async def concurrent(send: Send, n: int, width: int) -> dict[str, float]:
    latencies: list[float] = []
    clock = time.perf_counter
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = clock()
            await send()
            latencies.append(clock() - t0)

    start = clock()
    await asyncio.gather(*(worker() for _ in range(width)))
    return summary(latencies, clock() - start)


def median_round(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def write_section(name: str, markdown: str, path: Path = DOCS) -> None:
    """Replace the section between ``<!-- bench:NAME -->`` markers (or append it)."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def machine() -> str:
    import os
    import platform

    return (
        f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cores, {platform.machine()}"
    )
