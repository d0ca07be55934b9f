"""Deployment modes side by side: bare httpx, the in-process mesh, HAProxy, the meshlib sidecar, two sidecars over mTLS.

One run, one app, one machine. The app is the harness's tiny JSON app under uvicorn
(httptools, uvloop, no access log) in its own process; the client runs under uvloop
in this process and sends sequential GETs and 32-concurrent GETs, each path in turn,
interleaved over several rounds (the median round is reported), each on a fresh
client warmed the same way:

- ``httpx → app``: ``httpx.AsyncClient()`` straight to the app, the baseline;
- ``in-process mesh → app``: ``Mesh.from_files(config).async_client()`` to ``http://bench/``;
- ``httpx → HAProxy → app``: the reference hop. HAProxy (the distribution's, started here
  with a generated haproxy.cfg on free loopback ports: ``mode http``, keep-alive on both
  sides, ``nbthread 1`` so it is one process on one core like the sidecar) in front of the app;
- ``httpx → sidecar → app``: ``meshlib sidecar`` as the app's HTTP proxy
  (``httpx.AsyncClient(proxy=<outbound listener>)``, requests to ``http://bench/``), the
  same config file as the in-process mesh, the app's endpoint in plaintext;
- ``httpx → sidecar → sidecar (mTLS) → app``: an outbound sidecar whose ``bench`` endpoint
  is labelled ``security.istio.io/tlsMode: istio`` and points at a second sidecar's inbound
  listener (PeerAuthentication STRICT) in front of the app; both sidecars hold certificates
  from one CA made by ``meshlib ca init``;
- ``raw → ...``: the same paths (direct, HAProxy, one sidecar, two sidecars) with a minimal
  keep-alive HTTP/1.1 client on asyncio protocols (one connection sequentially, 32 under
  concurrency), so a hop's cost is not hidden behind httpx's own.

``wrk`` (one thread, 32 connections) then loads the app directly, HAProxy's frontend,
and the sidecar's outbound listener (origin-form requests with ``Host: bench``) for
requests per second. Each proxy's CPU per request comes from ``/proc/PID/stat``
(utime + stime, its whole process tree) before and after each measurement, summed over
the rounds; its RSS from ``/proc/PID/status``: idle (started, before any request), the
highest VmRSS sampled while wrk loads it, and VmHWM at the end. What each hop adds is
the path's p50 minus the same client's direct p50. The sidecar modes are skipped until
``meshlib/sidecar/_run.py`` exists. Run:

    .venv/bin/python benchmarks/modes.py [--rounds 3] [--requests 2000] [--duration 5]
        [--profile sidecar.speedscope.json] [--quick] [--no-write]

It prints the tables and writes them with docs/benchmarks-modes.png into docs/benchmarks.md,
section ``modes``. ``--profile`` samples the one-hop sidecar with py-spy during one more wrk run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import (
    DOCS,
    MTLS_WORKLOAD,
    PAYLOAD,
    PEER_AUTHENTICATION_STRICT,
    ROOT,
    app_command,
    concurrent,
    free_port,
    machine,
    median_round,
    sequential,
    serving,
    write_section,
)
from benchmarks.inprocess import policy
from meshlib import Mesh

SIDECAR_RUN = ROOT / "meshlib" / "sidecar" / "_run.py"
"""The sidecar's entry point: the sidecar modes run once it exists."""
IMAGE = ROOT / "docs" / "benchmarks-modes.png"
HOST = "bench"
CLIENT_WORKLOAD = "bench-client"

GOAL_HOP_RATIO = 1.5
"""One sidecar hop adds at most 1.5x what one HAProxy hop adds (p50)."""
GOAL_TWO_HOPS_US = 500.0
"""Two sidecars with mTLS add at most 0.5 ms (p50)."""
GOAL_RPS_SHARE = 0.5
"""One sidecar sustains at least half of HAProxy's requests per second through one hop."""
GOAL_RSS_IDLE_MB = 40.0
GOAL_RSS_LOAD_MB = 60.0
SEED_CLAIM_MS = (1.0, 3.0)
"""What the seed claims a sidecar hop costs: 1-3 ms."""


# -- the paths ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """Where a request goes after the client: the proxies on the way (process names), then the app."""

    name: str
    label: str
    hops: tuple[str, ...]

    @property
    def sidecar(self) -> bool:
        return any(h.startswith("sidecar") for h in self.hops)


DIRECT = Route("direct", "app", ())
HAPROXY = Route("haproxy", "HAProxy → app", ("haproxy",))
SIDECAR = Route("sidecar", "sidecar → app", ("sidecar",))
TWO = Route("two", "sidecar → sidecar (mTLS) → app", ("sidecar-out", "sidecar-in"))
ROUTES = (DIRECT, HAPROXY, SIDECAR, TWO)

PROXIES = {
    "haproxy": "HAProxy",
    "sidecar": "sidecar (one hop)",
    "sidecar-out": "sidecar, outbound (mTLS pair)",
    "sidecar-in": "sidecar, inbound (mTLS pair)",
}


@dataclass(frozen=True)
class Row:
    client: str
    """``httpx``, ``mesh`` (the in-process mesh client) or ``raw``."""
    route: Route

    @property
    def label(self) -> str:
        client = "in-process mesh" if self.client == "mesh" else self.client
        return f"{client} → {self.route.label}"

    @property
    def base(self) -> Row:
        """The same kind of client straight to the app: what a hop's cost is measured against."""
        return Row("raw" if self.client == "raw" else "httpx", DIRECT)


ROWS = (
    Row("httpx", DIRECT),
    Row("mesh", DIRECT),
    Row("httpx", HAPROXY),
    Row("httpx", SIDECAR),
    Row("httpx", TWO),
    Row("raw", DIRECT),
    Row("raw", HAPROXY),
    Row("raw", SIDECAR),
    Row("raw", TWO),
)
LOADS = ("sequential", "concurrent")


# -- the processes --------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a sidecar may run workers)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its descendants, from /proc/PID/stat."""
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (MB) of ``pid`` and its descendants, summed."""
    out = {"VmRSS": 0.0, "VmHWM": 0.0}
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in out:
                    out[name] += int(value.split()[0]) / 1024
    return out


def _ticks() -> dict[int, int]:
    """utime + stime (clock ticks) of every process on the machine."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            out[int(stat.parent.name)] = int(fields[11]) + int(fields[12])
    return out


def others_cores(before: dict[int, int], after: dict[int, int], seconds: float, ours: set[int]) -> float:
    """The cores that processes outside this benchmark kept busy between two ``_ticks`` (those alive at both)."""
    spent = sum(after[pid] - before[pid] for pid in after if pid in before and pid not in ours)
    return spent / os.sysconf("SC_CLK_TCK") / seconds


def _others_busy() -> str:
    """The processes (not this one's) that used a tenth of a core or more over half a second, or ''."""
    before = _ticks()
    time.sleep(0.5)
    after = _ticks()
    hz = os.sysconf("SC_CLK_TCK")
    busy = [(after[pid] - before[pid]) / hz / 0.5 for pid in after if pid in before and pid != os.getpid()]
    busy = sorted((b for b in busy if b >= 0.1), reverse=True)
    return f"{len(busy)} processes, {sum(busy):.1f} cores" if busy else ""


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None)


def ensure_haproxy() -> str | None:
    """HAProxy's path, installed from apt first when missing and this is root with apt-get (as .ci/run is)."""
    found = haproxy_binary()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        print("haproxy is missing: apt-get install haproxy", flush=True)
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "haproxy"]):
            subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL)
        found = haproxy_binary()
    return found


def haproxy_config(port: int, app_port: int) -> str:
    """A minimal reverse proxy: HTTP mode, keep-alive to the client and (reused) to the app, one thread, no log."""
    return f"""global
    nbthread 1
    maxconn 256

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s

frontend bench
    bind 127.0.0.1:{port}
    default_backend app

backend app
    server app 127.0.0.1:{app_port}
"""


def mesh_policy(port: int, mtls: bool = False, limit: bool = False) -> list[dict[str, Any]]:
    """The in-process benchmark's client policy for host ``bench``; without ``limit``, no client RateLimitPolicy.

    Route match, retries, route and per-try timeouts, LEAST_REQUEST, pool limits, outlier
    detection, a retry budget, metrics; no access log, tracing off (the context still propagates).
    """
    return [d for d in policy(port, mtls=mtls) if limit or d["kind"] != "RateLimitPolicy"]


def _meshlib() -> list[str]:
    return [sys.executable, "-m", "meshlib"]


def _write_yaml(path: Path, documents: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class Sidecar:
    outbound: int
    inbound: int
    admin: int
    pid: int = 0


class Stack(contextlib.ExitStack):
    """The app, HAProxy and (when it exists) three sidecars: one plain hop, and an outbound/inbound mTLS pair."""

    def __init__(self, tmp: Path, haproxy: str, with_sidecar: bool, limit: bool) -> None:
        super().__init__()
        self.tmp = tmp
        self.haproxy_bin = haproxy
        self.with_sidecar = with_sidecar
        self.limit = limit
        self.pids: dict[str, int] = {}
        self.sidecars: dict[str, Sidecar] = {}
        self.app_port = free_port()
        self.haproxy_port = free_port()
        self.config = _write_yaml(tmp / "mesh.yaml", mesh_policy(self.app_port, limit=limit))
        """The one-hop sidecar's config, and the in-process mesh's."""
        self.idle: dict[str, dict[str, float]] = {}

    def start(self) -> None:
        self.pids["app"] = self.enter_context(serving(app_command(self.app_port), self.app_port)).pid
        cfg = self.tmp / "haproxy.cfg"
        cfg.write_text(haproxy_config(self.haproxy_port, self.app_port), encoding="utf-8")
        argv = [self.haproxy_bin, "-db", "-q", "-f", str(cfg)]
        self.pids["haproxy"] = self.enter_context(serving(argv, self.haproxy_port)).pid
        if self.with_sidecar:
            self._start_sidecars()
        time.sleep(1.0)  # settled: the idle figures are after start-up, before any request
        self.idle = {name: memory(self.pids[name]) for name in PROXIES if name in self.pids}

    def _start_sidecars(self) -> None:
        ca = self.tmp / "ca"
        subprocess.run([*_meshlib(), "ca", "init", str(ca)], check=True, stdout=subprocess.DEVNULL)
        names = ("sidecar", "sidecar-out", "sidecar-in")
        pair = {name: Sidecar(free_port(), free_port(), free_port()) for name in names}
        mesh_config = mesh_policy(self.app_port)[-1]
        configs = {
            "sidecar": self.config,
            "sidecar-out": _write_yaml(
                self.tmp / "out.yaml", mesh_policy(pair["sidecar-in"].inbound, mtls=True, limit=self.limit)
            ),
            "sidecar-in": _write_yaml(self.tmp / "in.yaml", [PEER_AUTHENTICATION_STRICT, mesh_config]),
        }
        for name, side in pair.items():
            inbound = name == "sidecar-in"
            argv = [
                *_meshlib(),
                "sidecar",
                "--workload",
                MTLS_WORKLOAD if inbound else CLIENT_WORKLOAD,
                "--namespace",
                "default",
                "--labels",
                f"app={MTLS_WORKLOAD if inbound else CLIENT_WORKLOAD}",
                "--config",
                str(configs[name]),
                "--app",
                f"127.0.0.1:{self.app_port}",
                "--inbound",
                f"127.0.0.1:{side.inbound}",
                "--outbound",
                f"127.0.0.1:{side.outbound}",
                "--admin",
                f"127.0.0.1:{side.admin}",
            ]
            if name != "sidecar":
                argv += ["--ca", str(ca)]
            log = (self.tmp / f"{name}.log").open("wb")
            self.callback(log.close)
            proc = self.enter_context(serving(argv, side.admin, timeout=30, stdout=log, stderr=subprocess.STDOUT))
            side.pid = self.pids[name] = proc.pid
            self.sidecars[name] = side
        for name, side in self.sidecars.items():
            self._wait_ready(name, side)

    def _wait_ready(self, name: str, side: Sidecar) -> None:
        deadline = time.monotonic() + 30
        while True:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{side.admin}/ready", timeout=1) as r,
            ):
                if r.status == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after 30 s; its log:\n{self.log(name)}")
            time.sleep(0.1)

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def admin(self, name: str, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.sidecars[name].admin}{path}", timeout=5) as r:
            text: str = r.read().decode()
            return text

    def target(self, route: Route) -> tuple[int, str]:
        """The port a raw client or wrk connects to for ``route``, and the Host header it sends."""
        if route is DIRECT:
            return self.app_port, f"127.0.0.1:{self.app_port}"
        if route is HAPROXY:
            return self.haproxy_port, f"127.0.0.1:{self.haproxy_port}"
        side = self.sidecars["sidecar" if route is SIDECAR else "sidecar-out"]
        return side.outbound, HOST

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}


# -- the raw client -------------------------------------------------------------------------

_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)")


def parse_response(buf: bytearray) -> tuple[int, bytes, int] | None:
    """A complete response at the start of ``buf``: status, body and the bytes it took; None while incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    status, start = int(head[9:12]), end + 4
    length = _LENGTH.search(head)
    if length is not None:
        stop = start + int(length.group(1))
        return (status, bytes(buf[start:stop]), stop) if len(buf) >= stop else None
    if b"\r\ntransfer-encoding:" not in head or b"chunked" not in head:
        return status, b"", start
    body, pos = bytearray(), start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        if size == 0:
            if buf[eol + 2 : eol + 4] == b"\r\n":
                return status, bytes(body), eol + 4
            trailers = buf.find(b"\r\n\r\n", eol)
            return (status, bytes(body), trailers + 4) if trailers >= 0 else None
        if len(buf) < eol + 2 + size + 2:
            return None
        body += buf[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2


class RawConnection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection: write a request, wait for its whole response."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's TCPTransport is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and not self.waiter.done():
            parsed = parse_response(self.buffer)
            if parsed is not None:
                del self.buffer[: parsed[2]]
                self.waiter.set_result(parsed[:2])

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("the server closed the connection"))

    async def request(self, data: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


class RawClient:
    """``width`` kept-alive connections to one port, each taking the next request when free."""

    def __init__(self, port: int, host: str) -> None:
        self.port = port
        self.request = f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: raw\r\n\r\n".encode()
        self.idle: list[RawConnection] = []

    async def open(self, width: int) -> RawClient:
        loop = asyncio.get_running_loop()
        for _ in range(width):
            _, conn = await loop.create_connection(RawConnection, "127.0.0.1", self.port)
            self.idle.append(conn)
        return self

    async def send(self) -> None:
        conn = self.idle.pop()
        try:
            status, body = await conn.request(self.request)
        finally:
            self.idle.append(conn)
        if status != 200 or body != PAYLOAD:
            raise RuntimeError(f"raw client: unexpected answer {status} {body[:200]!r}")

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()


# -- measuring ------------------------------------------------------------------------------


@dataclass
class Results:
    rows: tuple[Row, ...]
    routes: tuple[Route, ...]
    sizes: dict[str, int]
    width: int
    rounds: int
    duration: float
    latency: dict[tuple[Row, str], dict[str, float]] = field(default_factory=dict)
    cpu: dict[tuple[Row, str], dict[str, float]] = field(default_factory=dict)
    """Seconds of CPU per request of each process, over every round of that measurement."""
    wrk: dict[Route, dict[str, float]] = field(default_factory=dict)
    wrk_cpu: dict[Route, dict[str, float]] = field(default_factory=dict)
    idle: dict[str, dict[str, float]] = field(default_factory=dict)
    loaded: dict[str, float] = field(default_factory=dict)
    """The highest VmRSS (MB) sampled while wrk loaded each proxy."""
    peak: dict[str, float] = field(default_factory=dict)
    """VmHWM (MB) at the end of the run."""
    notes: list[str] = field(default_factory=list)
    limit: bool = False


def _httpx_client(row: Row, stack: Stack, mesh: Mesh) -> tuple[httpx.AsyncClient, str]:
    if row.client == "mesh":
        return mesh.async_client(), f"http://{HOST}/"
    if row.route is DIRECT:
        return httpx.AsyncClient(), f"http://127.0.0.1:{stack.app_port}/"
    if row.route is HAPROXY:
        return httpx.AsyncClient(), f"http://127.0.0.1:{stack.haproxy_port}/"
    port, _ = stack.target(row.route)
    return httpx.AsyncClient(proxy=f"http://127.0.0.1:{port}"), f"http://{HOST}/"


@contextlib.asynccontextmanager
async def _sender(row: Row, load: str, stack: Stack, mesh: Mesh, width: int) -> Any:
    if row.client == "raw":
        port, host = stack.target(row.route)
        raw = await RawClient(port, host).open(width if load == "concurrent" else 1)
        try:
            yield raw.send
        finally:
            raw.close()
        return
    client, url = _httpx_client(row, stack, mesh)
    async with client:

        async def send() -> None:
            response = await client.get(url)
            if response.status_code != 200 or response.content != PAYLOAD:
                raise RuntimeError(f"{row.label}: unexpected answer {response.status_code} {response.text[:200]!r}")

        yield send


async def _measure_one(send: Callable[[], Awaitable[Any]], load: str, n: int, width: int) -> dict[str, float]:
    if load == "sequential":
        await sequential(send, max(20, n // 10))
        return await sequential(send, n)
    await concurrent(send, max(20, n // 10), width)
    return await concurrent(send, n, width)


async def measure(stack: Stack, res: Results) -> None:
    mesh = Mesh.from_files(stack.config, workload=CLIENT_WORKLOAD)
    raw: dict[tuple[Row, str], list[dict[str, float]]] = {}
    spent: dict[tuple[Row, str], dict[str, float]] = {}
    wrk_rounds: dict[Route, list[dict[str, float]]] = {}
    wrk_spent: dict[Route, dict[str, float]] = {}
    try:
        for _ in range(res.rounds):
            for row in res.rows:
                for load in LOADS:
                    n = res.sizes[load]
                    async with _sender(row, load, stack, mesh, res.width) as send:
                        before = stack.cpu()
                        result = await _measure_one(send, load, n, res.width)
                        after = stack.cpu()
                    raw.setdefault((row, load), []).append(result)
                    acc = spent.setdefault((row, load), {"requests": 0.0})
                    acc["requests"] += n + max(20, n // 10)
                    for name in after:
                        acc[name] = acc.get(name, 0.0) + after[name] - before[name]
            if res.duration > 0:
                for route in res.routes:
                    before = stack.cpu()
                    out = wrk(stack, route, res.duration, 32, res.loaded)
                    after = stack.cpu()
                    wrk_rounds.setdefault(route, []).append(out)
                    acc = wrk_spent.setdefault(route, {"requests": 0.0})
                    acc["requests"] += out["requests"]
                    for name in after:
                        acc[name] = acc.get(name, 0.0) + after[name] - before[name]
    finally:
        mesh.close()
    res.latency = {key: median_round(rounds) for key, rounds in raw.items()}
    res.cpu = {key: _per_request(acc) for key, acc in spent.items()}
    res.wrk = {route: median_round(rounds) for route, rounds in wrk_rounds.items()}
    res.wrk_cpu = {route: _per_request(acc) for route, acc in wrk_spent.items()}


def _per_request(acc: dict[str, float]) -> dict[str, float]:
    return {name: value / acc["requests"] for name, value in acc.items() if name != "requests"}


def wrk(stack: Stack, route: Route, duration: float, connections: int, loaded: dict[str, float]) -> dict[str, float]:
    """wrk against ``route``'s entry; the proxies' VmRSS sampled every 100 ms meanwhile (the highest kept)."""
    port, host = stack.target(route)
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "-H", f"Host: {host}"]
    proc = subprocess.Popen([*cmd, f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, text=True)
    while proc.poll() is None:
        for name in route.hops:
            loaded[name] = max(loaded.get(name, 0.0), memory(stack.pids[name])["VmRSS"])
        time.sleep(0.1)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed against {route.label}:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if errors:
        raise RuntimeError(f"wrk against {route.label}: {errors.group(1)} non-2xx responses")
    sockets = re.search(r"Socket errors: (.*)", out)
    requests = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if requests is None or rps is None:
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    return {
        "rps": float(rps.group(1)),
        "requests": float(requests.group(1)),
        "p50_us": _us(re.search(r"50%\s+([\d.]+)(us|ms|s)\b", out)),
        "p99_us": _us(re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)),
        "socket_errors": 1.0 if sockets else 0.0,
    }


def _us(match: re.Match[str] | None) -> float:
    if match is None:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value if unit == "us" else value * 1000 if unit == "ms" else value * 1e6


def profile_sidecar(stack: Stack, path: Path, duration: float) -> None:
    """py-spy samples the one-hop sidecar (and its children) while wrk loads it once more."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        raise SystemExit("--profile needs py-spy in the venv: .venv/bin/pip install py-spy")
    fmt = "raw" if path.suffix in (".txt", ".folded") else "speedscope"
    cmd = [str(spy), "record", "--pid", str(stack.pids["sidecar"]), "--rate", "250", "--subprocesses"]
    cmd += ["--format", fmt, "-o", str(path), "--duration", str(max(1, round(duration)))]
    spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    wrk(stack, SIDECAR, duration, 32, {})
    spy_proc.wait(timeout=60)


def run(args: argparse.Namespace, sizes: dict[str, int], width: int, rounds: int, duration: float) -> Results:
    haproxy = ensure_haproxy()
    if haproxy is None:
        raise SystemExit("haproxy is missing (python3 dev.py setup installs it as root; or apt-get install haproxy)")
    with_sidecar = SIDECAR_RUN.exists()
    routes = ROUTES if with_sidecar else (DIRECT, HAPROXY)
    rows = tuple(r for r in ROWS if r.route in routes)
    res = Results(rows, routes, sizes, width, rounds, duration, limit=args.limit)
    if not with_sidecar:
        res.notes.append(f"sidecar modes skipped: {SIDECAR_RUN.relative_to(ROOT)} does not exist yet")
    busy = _others_busy()
    if busy:
        res.notes.append(f"warning: other processes were busy when the run started ({busy}): expect noisier figures")
    with (
        tempfile.TemporaryDirectory(prefix="meshlib-modes-") as tmp,
        Stack(Path(tmp), haproxy, with_sidecar, args.limit) as stack,
    ):
        stack.start()
        res.idle = stack.idle
        import uvloop

        ticks, started = _ticks(), time.monotonic()
        uvloop.run(measure(stack, res))
        ours = {os.getpid(), *(p for pid in stack.pids.values() for p in _tree(pid))}
        others = others_cores(ticks, _ticks(), time.monotonic() - started, ours)
        if others >= 0.1:
            res.notes.append(
                f"warning: other processes on the machine used {others:.1f} cores on average during the run: "
                "expect noisier figures"
            )
        res.peak = {name: memory(stack.pids[name])["VmHWM"] for name in PROXIES if name in stack.pids}
        if with_sidecar:
            metrics = stack.admin("sidecar-in", "/metrics")
            if "mutual_tls" not in metrics:
                res.notes.append("the inbound sidecar's /metrics names no mutual_tls request: check the mTLS pair")
            for name in stack.sidecars:
                bad = [line for line in stack.log(name).splitlines() if "Traceback" in line or "ERROR" in line]
                if bad:
                    res.notes.append(f"{name} logged {len(bad)} errors, e.g. {bad[0][:200]}")
        if args.profile:
            profile_sidecar(stack, Path(args.profile).resolve(), duration or 5.0)
            print(f"wrote {args.profile}")
    return res


# -- the report -----------------------------------------------------------------------------


def _goal(met: bool) -> str:
    return "met" if met else "**not met**"


def adds(res: Results, row: Row, load: str = "sequential") -> float:
    return res.latency[(row, load)]["p50_us"] - res.latency[(row.base, load)]["p50_us"]


def _proxy_cpu(cpu: dict[str, float], route: Route) -> str:
    if not route.hops:
        return ""
    return " + ".join(f"{cpu[h] * 1e6:.0f}" for h in route.hops)


def latency_table(res: Results) -> str:
    conc = f"{res.width} concurrent"
    lines = [
        f"| path | sequential p50 µs | p99 µs | adds (p50) | {conc} p50 µs | p99 µs | req/s | adds (p50) "
        "| proxy CPU µs/req |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in res.rows:
        s, c = res.latency[(row, "sequential")], res.latency[(row, "concurrent")]
        add_s = f"{adds(res, row):+.0f}" if row != row.base else ""
        add_c = f"{adds(res, row, 'concurrent'):+.0f}" if row != row.base else ""
        cpu = _proxy_cpu(res.cpu[(row, "sequential")], row.route)
        lines.append(
            f"| {row.label} | {s['p50_us']:.0f} | {s['p99_us']:.0f} | {add_s} | {c['p50_us']:.0f} | {c['p99_us']:.0f}"
            f" | {c['rps']:.0f} | {add_c} | {cpu} |"
        )
    return "\n".join(lines)


def wrk_table(res: Results) -> str:
    base = res.wrk[DIRECT]["rps"]
    lines = [
        "| wrk → | req/s | vs direct | p50 µs | p99 µs | proxy CPU µs/req |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for route in res.routes:
        w = res.wrk[route]
        lines.append(
            f"| {route.label} | {w['rps']:.0f} | {w['rps'] / base:.2f}x | {w['p50_us']:.0f} | {w['p99_us']:.0f}"
            f" | {_proxy_cpu(res.wrk_cpu[route], route)} |"
        )
    return "\n".join(lines)


def resources_table(res: Results) -> str:
    lines = [
        "| proxy | RSS idle MB | RSS under wrk MB (highest VmRSS) | VmHWM MB | CPU µs/req, raw sequential "
        "| CPU µs/req, wrk |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in PROXIES.items():
        if name not in res.idle:
            continue
        route = HAPROXY if name == "haproxy" else SIDECAR if name == "sidecar" else TWO
        seq = res.cpu[(Row("raw", route), "sequential")][name] * 1e6
        under = res.wrk_cpu[route][name] * 1e6 if route in res.wrk_cpu else float("nan")
        loaded = res.loaded.get(name, float("nan"))
        lines.append(
            f"| {label} | {res.idle[name]['VmRSS']:.1f} | {loaded:.1f} | {res.peak[name]:.1f} | {seq:.0f}"
            f" | {under:.0f} |"
        )
    return "\n".join(lines)


def goals_table(res: Results) -> str:
    """The goals of issue #8, judged on the raw client (httpx's own cost and noise stay out); httpx's figures beside."""
    low, high = SEED_CLAIM_MS
    lines = ["| goal | measured | target | | seed claims |", "| --- | --- | --- | --- | --- |"]
    if SIDECAR not in res.routes:
        lines.append("| every sidecar goal | skipped: no sidecar yet | | | |")
        return "\n".join(lines)
    side, ha = adds(res, Row("raw", SIDECAR)), adds(res, Row("raw", HAPROXY))
    ratio = side / ha if ha > 0 else float("inf")
    httpx_side, httpx_ha = adds(res, Row("httpx", SIDECAR)), adds(res, Row("httpx", HAPROXY))
    two, httpx_two = adds(res, Row("raw", TWO)), adds(res, Row("httpx", TWO))
    lines += [
        f"| one sidecar hop adds ≤ {GOAL_HOP_RATIO}x what one HAProxy hop adds (sequential p50) "
        f"| sidecar {side:+.0f} µs, HAProxy {ha:+.0f} µs: {ratio:.1f}x (httpx client: {httpx_side:+.0f} µs and "
        f"{httpx_ha:+.0f} µs) | ≤ {GOAL_HOP_RATIO}x | {_goal(ratio <= GOAL_HOP_RATIO)} "
        f"| {low:.0f} to {high:.0f} ms per hop |",
        f"| two sidecars with mTLS add ≤ {GOAL_TWO_HOPS_US / 1000:.1f} ms (sequential p50) "
        f"| {two / 1000:+.2f} ms (httpx client: {httpx_two / 1000:+.2f} ms) | ≤ {GOAL_TWO_HOPS_US / 1000:.1f} ms "
        f"| {_goal(two <= GOAL_TWO_HOPS_US)} | {2 * low:.0f} to {2 * high:.0f} ms for two hops |",
    ]
    if res.wrk:
        share = res.wrk[SIDECAR]["rps"] / res.wrk[HAPROXY]["rps"]
        lines.append(
            f"| one sidecar sustains ≥ {GOAL_RPS_SHARE:.0%} of HAProxy's req/s through one hop (wrk) "
            f"| {res.wrk[SIDECAR]['rps']:.0f} vs {res.wrk[HAPROXY]['rps']:.0f} req/s: {share:.0%} "
            f"| ≥ {GOAL_RPS_SHARE:.0%} | {_goal(share >= GOAL_RPS_SHARE)} | |"
        )
    sidecars = [n for n in PROXIES if n.startswith("sidecar") and n in res.idle]
    idle = max(res.idle[n]["VmRSS"] for n in sidecars)
    load = max(res.peak[n] for n in sidecars)
    lines += [
        f"| sidecar RSS idle ≤ {GOAL_RSS_IDLE_MB:.0f} MB | {idle:.1f} MB (the largest of {len(sidecars)}) "
        f"| ≤ {GOAL_RSS_IDLE_MB:.0f} MB | {_goal(idle <= GOAL_RSS_IDLE_MB)} | |",
        f"| sidecar RSS under load ≤ {GOAL_RSS_LOAD_MB:.0f} MB | {load:.1f} MB (the largest VmHWM of {len(sidecars)}) "
        f"| ≤ {GOAL_RSS_LOAD_MB:.0f} MB | {_goal(load <= GOAL_RSS_LOAD_MB)} | |",
    ]
    return "\n".join(lines)


def limit_text(res: Results) -> str:
    return (
        " with its client RateLimitPolicy" if res.limit else " without its client RateLimitPolicy (`--limit` adds it)"
    )


def summary(res: Results) -> str:
    """One paragraph: what a hop costs, next to what the seed claimed."""
    if SIDECAR not in res.routes:
        return "The sidecar modes were skipped: `meshlib/sidecar/_run.py` does not exist yet."
    ha, side, two = (adds(res, Row("raw", r)) for r in (HAPROXY, SIDECAR, TWO))
    times = f"{side / ha:.0f}x" if ha > 0 else "next to nothing measurable for"
    text = (
        f"**Per hop.** With the raw client, sequentially, at p50: HAProxy adds {ha:.0f} µs, one sidecar "
        f"{side:.0f} µs ({times} HAProxy's), two sidecars with mTLS {two:.0f} µs; the seed claimed "
        f"{SEED_CLAIM_MS[0]:.0f} to {SEED_CLAIM_MS[1]:.0f} ms per hop."
    )
    if res.wrk:
        cpu_ha, cpu_side = res.wrk_cpu[HAPROXY]["haproxy"] * 1e6, res.wrk_cpu[SIDECAR]["sidecar"] * 1e6
        text += (
            f" Under wrk one sidecar moves {res.wrk[SIDECAR]['rps']:.0f} req/s, "
            f"{res.wrk[SIDECAR]['rps'] / res.wrk[HAPROXY]['rps']:.0%} of HAProxy's {res.wrk[HAPROXY]['rps']:.0f} "
            f"(which the app itself bounds: {res.wrk[DIRECT]['rps']:.0f} req/s direct), spending {cpu_side:.0f} µs "
            f"of CPU per request against HAProxy's {cpu_ha:.0f} µs."
        )
    return text


def setting(res: Results) -> str:
    wrk = (
        f"; wrk: 1 thread, 32 connections, {res.duration:.0f} s per path per round"
        if res.duration > 0
        else "; no wrk run"
    )
    return (
        f"median of {res.rounds} interleaved rounds; {res.sizes['sequential']} sequential GETs and "
        f"{res.sizes['concurrent']} GETs at {res.width} concurrent per path per round{wrk}; every process on "
        f"loopback on the same machine ({machine()})"
    )


def plot(res: Results, path: Path) -> bool:
    """Latency per path (log scale: the raw client's µs next to httpx's ms), then wrk's req/s and each proxy's CPU."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = 2 if res.wrk else 1
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4.2 * rows), squeeze=False)
    labels = [row.label for row in res.rows]
    ys = list(range(len(labels)))
    for ax, load in zip(axes[0], LOADS, strict=True):
        p50 = [res.latency[(row, load)]["p50_us"] for row in res.rows]
        p99 = [res.latency[(row, load)]["p99_us"] for row in res.rows]
        ax.barh([y - 0.2 for y in ys], p50, height=0.4, label="p50")
        ax.barh([y + 0.2 for y in ys], p99, height=0.4, label="p99")
        ax.set_yticks(ys, labels if load == "sequential" else [""] * len(labels), fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("latency (µs, log scale)")
        ax.set_title(f"{load}, p50 and p99" if load == "sequential" else f"{res.width} concurrent, p50 and p99")
        ax.grid(axis="x", which="major", alpha=0.3)
        ax.legend(fontsize=8)
    if res.wrk:
        ax = axes[1][0]
        names = [route.label for route in res.routes]
        rps = [res.wrk[route]["rps"] / 1000 for route in res.routes]
        ax.barh(range(len(names)), rps, color="tab:green")
        for y, value in enumerate(rps):
            ax.text(value, y, f" {value:.1f}k", va="center", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("thousand requests/s")
        ax.set_title("wrk, 32 connections: requests/s")
        ax.set_xlim(0, max(rps) * 1.2)
        ax = axes[1][1]
        proxies = [name for name in PROXIES if name in res.idle]
        route_of = {"haproxy": HAPROXY, "sidecar": SIDECAR, "sidecar-out": TWO, "sidecar-in": TWO}
        cpu = [res.wrk_cpu[route_of[name]][name] * 1e6 for name in proxies]
        ax.barh(range(len(proxies)), cpu, color="tab:purple")
        for y, value in enumerate(cpu):
            ax.text(value, y, f" {value:.0f} µs", va="center", fontsize=8)
        ax.set_yticks(range(len(proxies)), [PROXIES[name] for name in proxies], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("CPU µs per request (utime + stime)")
        ax.set_title("each proxy's CPU per request under wrk")
        ax.set_xlim(0, max(cpu) * 1.25)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000, help="sequential GETs per path per round")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of wrk per path per round (0: no wrk)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests, 1 s of wrk, nothing written")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument(
        "--limit", action="store_true", help="add the in-process benchmark's client RateLimitPolicy to the mesh config"
    )
    parser.add_argument("--profile", metavar="PATH", help="py-spy the one-hop sidecar under wrk into this file")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (python3 dev.py setup installs it as root; or apt-get install wrk)")
        return 1
    if args.quick:
        sizes, width, rounds, duration = {"sequential": 50, "concurrent": 100}, 8, 1, 1.0
    else:
        sizes = {"sequential": args.requests, "concurrent": round(args.requests * 2.5)}
        width, rounds, duration = 32, args.rounds, args.duration
    res = run(args, sizes, width, rounds, duration)
    tables = [latency_table(res)]
    if res.wrk:
        tables.append(wrk_table(res))
    tables += [resources_table(res), goals_table(res)]
    print(setting(res), *tables, summary(res), *res.notes, sep="\n\n")
    if args.quick or args.no_write:
        return 0
    has_plot = plot(res, IMAGE)
    body = [
        "## Deployment modes: in-process, sidecar, HAProxy",
        "",
        f"`{Path(sys.argv[0]).name}` — {setting(res)}. Reproduce with `.venv/bin/python benchmarks/modes.py`.",
        "",
        "The same app (the tiny JSON app under uvicorn, httptools, uvloop) is reached straight, through the "
        "in-process mesh client, through HAProxy (one thread, HTTP mode, keep-alive both sides, no policy), through "
        "one `meshlib sidecar` used as the client's HTTP proxy, and through two sidecars speaking mTLS to each other "
        "(certificates from one `meshlib ca init` CA, PeerAuthentication STRICT on the inbound one). The mesh "
        f"config (in-process and sidecar) is the in-process benchmark's client policy{limit_text(res)}. `raw` is a "
        "minimal keep-alive HTTP/1.1 client on asyncio protocols: its rows show what a hop costs without httpx's own "
        "cost around it (httpx's pool is slow at 32 concurrent, see above, so its concurrent rows say little about "
        "the hops). *adds* is the path's p50 minus the same client's direct p50. Proxy CPU is per request, from "
        "`/proc/PID/stat` (two figures for the mTLS pair: outbound + inbound). Every process shares the same "
        "cores, wrk and the client included.",
        "",
        latency_table(res),
    ]
    if res.wrk:
        body += ["", wrk_table(res)]
    body += ["", resources_table(res), "", "Goals of issue #8, and what the seed claimed:", "", goals_table(res)]
    body += ["", summary(res)]
    body += [f"\n{note}" for note in res.notes]
    if has_plot:
        body += ["", f"![deployment modes]({IMAGE.name})"]
    write_section("modes", "\n".join(body), DOCS)
    print(f"wrote {DOCS.relative_to(ROOT)}" + (f" and {IMAGE.relative_to(ROOT)}" if has_plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
