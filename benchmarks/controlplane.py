"""Control-plane push: N subscribed data planes, one change, the time until every one ACKs, and the RSS.

``meshlib control-plane`` runs as its own process (a temporary state dir, a free
loopback port, a config of a dozen resources: ServiceEntries, DestinationRules,
VirtualServices, AuthorizationPolicies and a RateLimitPolicy, so pushes are realistic
and the ten workloads' views differ). Subscriber processes (``--workers``, under
uvloop) each hold a share of the N data planes as asyncio tasks speaking raw HTTP/1.1:
one ``GET /v1/stream`` per data plane (SSE over chunked encoding, read with a minimal
parser that takes ``version`` and ``nonce`` from the event without decoding the
resources) and one kept-alive connection per data plane for ``POST /v1/ack``, sent
for every snapshot. The data planes are spread over ten workload names, each with its
own service account and bootstrap token.

Once every data plane has ACKed the initial version, the benchmark applies one change
(``POST /v1/resources``: a VirtualService every workload sees gets a new timeout) and
takes, per data plane, the time from the apply request returning (and from it being
sent) to that data plane's ACK being sent; it repeats over ``--changes`` changes and
reports p50, p99 and max over all of them and the time until every data plane had
ACKed, then checks through ``GET /v1/dataplanes`` that all N show ACKED on the last
version. The control plane's RSS (``/proc/PID/status`` VmRSS, VmHWM) is read idle before
any subscriber, with N subscribed, and at its peak. Clocks: ``time.monotonic`` is
CLOCK_MONOTONIC, one clock for every process of the machine. Run:

    .venv/bin/python benchmarks/controlplane.py [--dataplanes 1000] [--changes 5] [--workers 4] [--pause 1]
        [--profile cp.speedscope.json] [--quick] [--no-write]

It prints the tables and writes them into docs/benchmarks.md, section ``controlplane``. ``--pause``
is the wait between changes: over uvicorn's keep-alive timeout (5 s) the server closes the idle
ACK connections, and every ACK pays a new connection. ``--profile`` samples the control plane with
py-spy (``.venv/bin/pip install py-spy``) from the first subscriber to the last change.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import DOCS, ROOT, free_port, machine, write_section

GOAL_P99 = 1.0
"""Seconds: the issue's goal for the p99 from a change to a data plane's ACK."""
GOAL_RSS_MB = 150.0
"""MB: the issue's goal for the control plane's resident memory with 1,000 data planes."""
WORKLOADS = ("orders", "payments", "catalog", "search", "cart", "checkout", "users", "shipping", "reviews", "frontend")
NODE_PREFIX = "bench-dp-"
CHANGED = ("VirtualService", "orders")
"""The resource every change rewrites: every workload sees every VirtualService, so every data plane gets a push."""


# -- the configuration ----------------------------------------------------------------


def _service_entry(name: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "hosts": [f"{name}.default.svc.cluster.local"],
            "location": "MESH_INTERNAL",
            "resolution": "STATIC",
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
            "endpoints": [
                {"address": f"10.0.{i}.{port % 250}", "ports": {"http": port}, "labels": {"app": name, "version": v}}
                for i, v in enumerate(("v1", "v1", "v2"))
            ],
        },
    }


def _destination_rule(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "host": f"{name}.default.svc.cluster.local",
            "trafficPolicy": {
                "loadBalancer": {"simple": "LEAST_REQUEST"},
                "connectionPool": {"tcp": {"maxConnections": 100}, "http": {"http1MaxPendingRequests": 100}},
                "outlierDetection": {"consecutive5xxErrors": 5, "interval": "10s", "baseEjectionTime": "30s"},
            },
            "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
        },
    }


def virtual_service(name: str, timeout: int) -> dict[str, Any]:
    host = f"{name}.default.svc.cluster.local"
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "hosts": [host],
            "http": [
                {
                    "match": [{"headers": {"x-canary": {"exact": "1"}}}],
                    "route": [{"destination": {"host": host, "subset": "v2"}}],
                },
                {
                    "route": [
                        {"destination": {"host": host, "subset": "v1"}, "weight": 90},
                        {"destination": {"host": host, "subset": "v2"}, "weight": 10},
                    ],
                    "timeout": f"{timeout}s",
                    "retries": {"attempts": 2, "perTryTimeout": "1s", "retryOn": "5xx,reset,connect-failure"},
                },
            ],
        },
    }


def config() -> list[dict[str, Any]]:
    """A dozen resources: 4 ServiceEntries, 3 DestinationRules, 3 VirtualServices, 2 AuthorizationPolicies, 1 limit."""
    docs: list[dict[str, Any]] = [_service_entry(n, 8080 + i) for i, n in enumerate(WORKLOADS[:4])]
    docs += [_destination_rule(n) for n in WORKLOADS[:3]]
    docs += [virtual_service(n, 5) for n in WORKLOADS[:3]]
    docs += [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "orders-callers", "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": "orders"}},
                "action": "ALLOW",
                "rules": [
                    {"from": [{"source": {"principals": ["cluster.local/ns/default/sa/checkout"]}}]},
                    {"to": [{"operation": {"methods": ["GET"], "paths": ["/health"]}}]},
                ],
            },
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "payments-admin", "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": "payments"}},
                "action": "DENY",
                "rules": [{"to": [{"operation": {"paths": ["/admin", "/admin/*"]}}]}],
            },
        },
        {
            "apiVersion": "meshlib.io/v1alpha1",
            "kind": "RateLimitPolicy",
            "metadata": {"name": "catalog-per-caller", "namespace": "default"},
            "spec": {
                "side": "SERVER",
                "selector": {"matchLabels": {"app": "catalog"}},
                "limits": [{"name": "per-caller", "rate": "100/second", "key": "PRINCIPAL"}],
            },
        },
    ]
    return docs


# -- the subscriber processes -----------------------------------------------------------

_PUSH = re.compile(rb'\{"version":(\d+),"nonce":"([^"]*)"')


@dataclass
class _DataPlane:
    index: int
    node: str
    workload: str
    token: str
    ack: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None


class _Out:
    """Lines to the parent on stdout, flushed every 10 ms: the parent reads times from them, not their arrival."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.task: asyncio.Task[None] | None = None

    def put(self, line: str) -> None:
        self.lines.append(line)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(0.01)
        lines, self.lines = self.lines, []
        sys.stdout.write("".join(lines))
        sys.stdout.flush()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _ack(host: str, port: int, dp: _DataPlane, version: int, nonce: str, digest: str, out: _Out) -> None:
    """POST /v1/ack on the data plane's kept-alive connection (reconnecting when the server closed it)."""
    body = json.dumps(
        {"node": dp.node, "nonce": nonce, "version": version, "snapshot": digest, "error": None},
        separators=(",", ":"),
    ).encode()
    request = (
        f"POST /v1/ack HTTP/1.1\r\nhost: {host}:{port}\r\nauthorization: Bearer {dp.token}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    sent = time.monotonic()
    for attempt in range(3):
        if dp.ack is None or dp.ack[0].at_eof():
            if dp.ack is not None:
                dp.ack[1].close()
                out.put(f"R {dp.index}\n")
            dp.ack = await asyncio.open_connection(host, port)
        reader, writer = dp.ack
        try:
            writer.write(request)
            await writer.drain()
            status, headers = await _read_head(reader)
            length = int(headers.get("content-length", "0"))
            answer = await reader.readexactly(length) if length else b""
        except (ConnectionError, asyncio.IncompleteReadError):
            writer.close()
            dp.ack = None
            if attempt == 2:
                raise
            continue
        if headers.get("connection", "").lower() == "close":
            writer.close()
            dp.ack = None
        if status != 204:
            out.put(f"E {dp.index} ack answered {status}: {answer[:200]!r}\n")
            return
        out.put(f"A {dp.index} {version} {sent:.6f} {time.monotonic():.6f}\n")
        return


async def _subscribe(host: str, port: int, dp: _DataPlane, gate: asyncio.Semaphore, out: _Out) -> None:
    query = urlencode(
        [
            ("node", dp.node),
            ("workload", dp.workload),
            ("namespace", "default"),
            ("service_account", dp.workload),
            ("label", f"app={dp.workload}"),
            ("label", "version=v1"),
        ]
    )
    async with gate:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            f"GET /v1/stream?{query} HTTP/1.1\r\nhost: {host}:{port}\r\nauthorization: Bearer {dp.token}\r\n"
            "accept: text/event-stream\r\n\r\n".encode()
        )
        status, headers = await _read_head(reader)
    if status != 200 or "chunked" not in headers.get("transfer-encoding", ""):
        out.put(f"E {dp.index} stream answered {status} {headers}\n")
        return
    out.put(f"C {dp.index}\n")
    buffer = b""
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            out.put(f"E {dp.index} stream ended\n")
            return
        buffer += (await reader.readexactly(size + 2))[:-2]
        while (end := buffer.find(b"\n\n")) >= 0:
            event, buffer = buffer[:end], buffer[end + 2 :]
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    data = line[5:].lstrip()
                    match = _PUSH.match(data)
                    if match is None:  # not the server's own layout: decode it properly
                        push = json.loads(data)
                        version, nonce = int(push["version"]), str(push["nonce"])
                    else:
                        version, nonce = int(match[1]), match[2].decode()
                    digest = hashlib.sha256(data).hexdigest()[:16]
                    await _ack(host, port, dp, version, nonce, digest, out)


async def _worker(job: dict[str, Any]) -> None:
    host, port = job["host"], int(job["port"])
    out = _Out()
    gate = asyncio.Semaphore(32)
    dps = [_DataPlane(d["index"], d["node"], d["workload"], d["token"]) for d in job["dataplanes"]]

    async def run(dp: _DataPlane) -> None:
        try:
            await _subscribe(host, port, dp, gate, out)
        except Exception as exc:  # reported to the parent, which fails the run
            out.put(f"E {dp.index} {type(exc).__name__}: {exc}\n".replace("\n", " ").rstrip() + "\n")

    await asyncio.gather(*(run(dp) for dp in dps))
    await asyncio.sleep(0.05)


def worker_main(path: str) -> int:
    import uvloop

    job = json.loads(Path(path).read_text())
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    uvloop.run(_worker(job))
    return 0


# -- the control plane process ------------------------------------------------------------


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) / 1024
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Change:
    version: int
    sent: float
    returned: float
    acks: dict[int, tuple[float, float]] = field(default_factory=dict)
    cpu: float = 0.0

    @property
    def apply_s(self) -> float:
        return self.returned - self.sent

    def after_return(self) -> list[float]:
        return sorted(t - self.returned for t, _ in self.acks.values())

    def after_send(self) -> list[float]:
        return sorted(t - self.sent for t, _ in self.acks.values())

    def all_recorded(self) -> float:
        """From the apply returning to the control plane answering the last ACK (it has recorded them all)."""
        return max(done for _, done in self.acks.values()) - self.returned


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(len(ordered) * q + 0.999999) - 1))]


class Bench:
    """The control plane, its subscribers and what they report."""

    def __init__(self, tmp: Path, n: int, workers: int) -> None:
        self.tmp = tmp
        self.n = n
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "control-plane.log"
        self.acks: dict[int, dict[int, tuple[float, float]]] = {}
        self.connected: set[int] = set()
        self.errors: list[str] = []
        self.reconnects = 0
        self.arrived = asyncio.Event()
        self.children: list[asyncio.subprocess.Process] = []
        self.readers: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start_control_plane(self) -> None:
        path = self.tmp / "mesh.yaml"
        path.write_text("---\n".join(json.dumps(d) + "\n" for d in config()))
        cmd = [sys.executable, "-m", "meshlib", "control-plane", "--state-dir", str(self.tmp / "state")]
        cmd += ["--listen", f"127.0.0.1:{self.port}", "--config", str(path)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def stop_control_plane(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    async def wait_ready(self, client: Any) -> str:
        deadline = time.monotonic() + 30
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the control plane exited:\n{self.log_tail()}")
            with contextlib.suppress(Exception):
                r = await client.get(f"{self.url}/healthz")
                if r.status_code == 200 and (self.tmp / "state" / "admin-token").exists():
                    return (self.tmp / "state" / "admin-token").read_text().strip()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the control plane did not start:\n{self.log_tail()}")
            await asyncio.sleep(0.1)

    async def start_subscribers(self, tokens: dict[str, str]) -> None:
        dps = [
            {"index": i, "node": f"{NODE_PREFIX}{i:05d}", "workload": w, "token": tokens[w]}
            for i in range(self.n)
            for w in (WORKLOADS[i % len(WORKLOADS)],)
        ]
        for k in range(self.workers):
            job = self.tmp / f"worker-{k}.json"
            job.write_text(json.dumps({"host": "127.0.0.1", "port": self.port, "dataplanes": dps[k :: self.workers]}))
            child = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--worker", str(job), stdout=asyncio.subprocess.PIPE
            )
            self.children.append(child)
            self.readers.append(asyncio.create_task(self._read(child)))

    async def _read(self, child: asyncio.subprocess.Process) -> None:
        assert child.stdout is not None
        async for raw in child.stdout:
            kind, _, rest = raw.decode().rstrip("\n").partition(" ")
            if kind == "A":
                index, version, sent, done = rest.split()
                self.acks.setdefault(int(version), {})[int(index)] = (float(sent), float(done))
            elif kind == "C":
                self.connected.add(int(rest))
            elif kind == "R":
                self.reconnects += 1
            else:
                self.errors.append(rest)
            self.arrived.set()

    async def stop_subscribers(self) -> None:
        for child in self.children:
            if child.returncode is None:
                child.terminate()
        for child in self.children:
            await child.wait()
        for task in self.readers:
            task.cancel()

    async def all_acked(self, version: int, timeout: float) -> dict[int, tuple[float, float]]:
        """Every data plane's (ACK sent, ACK answered) for ``version``, once all N have ACKed it."""
        deadline = time.monotonic() + timeout
        while len(self.acks.get(version, {})) < self.n:
            if self.errors:
                raise RuntimeError(f"{len(self.errors)} subscriber errors, the first: {self.errors[0]}")
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the control plane exited:\n{self.log_tail()}")
            if any(c.returncode is not None for c in self.children):
                raise RuntimeError("a subscriber process exited")
            left = deadline - time.monotonic()
            if left <= 0:
                got = len(self.acks.get(version, {}))
                raise RuntimeError(f"only {got} of {self.n} data planes ACKed version {version} in {timeout:.0f} s")
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), min(left, 1.0))
        return self.acks[version]


@dataclass
class Results:
    n: int
    workers: int
    resources: int
    initial_s: float
    idle: dict[str, float]
    subscribed: dict[str, float]
    peak: float
    changes: list[Change]
    acked: int
    on_last: int
    dataplanes_s: float
    reconnects: int
    push_kb: dict[str, float]
    server_ack: dict[str, float]
    log_warnings: list[str]


async def measure(n: int, changes: int, workers: int, pause: float = 1.0, profile: Path | None = None) -> Results:
    """Start the control plane and the subscribers, apply ``changes`` changes ``pause`` s apart, and measure.

    With ``profile``, ``py-spy record`` samples the control plane from the first subscriber to the last
    change and writes a speedscope profile there.
    """
    import httpx

    with tempfile.TemporaryDirectory(prefix="meshlib-bench-cp-") as tmp:
        bench = Bench(Path(tmp), n, workers)
        bench.start_control_plane()
        spy: subprocess.Popen[bytes] | None = None
        try:
            async with httpx.AsyncClient(timeout=60) as client:
                admin = await bench.wait_ready(client)
                auth = {"authorization": f"Bearer {admin}"}
                tokens = {}
                for w in WORKLOADS:
                    r = await client.post(
                        f"{bench.url}/v1/tokens", json={"namespace": "default", "service_account": w}, headers=auth
                    )
                    r.raise_for_status()
                    tokens[w] = r.json()["token"]
                r = await client.get(f"{bench.url}/v1/resources", headers=auth)
                initial_version, resources = r.json()["version"], len(r.json()["resources"])
                await asyncio.sleep(1.0)
                idle = memory(bench.pid)
                spy = _py_spy(bench.pid, profile) if profile is not None else None

                started = time.monotonic()
                await bench.start_subscribers(tokens)
                first = await bench.all_acked(initial_version, timeout=60 + n / 10)
                initial_s = max(t for t, _ in first.values()) - started
                await asyncio.sleep(2.0)
                subscribed = memory(bench.pid)

                done: list[Change] = []
                for k in range(changes):
                    body = json.dumps(virtual_service(CHANGED[1], 6 + k))
                    cpu = cpu_seconds(bench.pid)
                    sent = time.monotonic()
                    r = await client.post(
                        f"{bench.url}/v1/resources",
                        content=body,
                        headers={**auth, "content-type": "application/json"},
                    )
                    returned = time.monotonic()
                    r.raise_for_status()
                    if not r.json().get("changed"):
                        raise RuntimeError(f"change {k} did not change the configuration: {r.text}")
                    change = Change(int(r.json()["version"]), sent, returned)
                    change.acks = dict(await bench.all_acked(change.version, timeout=60))
                    change.cpu = cpu_seconds(bench.pid) - cpu
                    done.append(change)
                    await asyncio.sleep(pause)
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(timeout=60)

                last = done[-1].version if done else initial_version
                t0 = time.monotonic()
                r = await client.get(f"{bench.url}/v1/dataplanes", headers=auth)
                dataplanes_s = time.monotonic() - t0
                r.raise_for_status()
                mine = [d for d in r.json()["dataplanes"] if str(d.get("node", "")).startswith(NODE_PREFIX)]
                acked = sum(1 for d in mine if d.get("state") == "ACKED")
                on_last = sum(1 for d in mine if d.get("state") == "ACKED" and d.get("acked_version") == last)
                metrics = (await client.get(f"{bench.url}/metrics")).text
                final = memory(bench.pid)
                push_kb = await _push_sizes(client, bench.url, tokens)
        finally:
            if spy is not None and spy.poll() is None:
                spy.kill()
                spy.wait()
            await bench.stop_subscribers()
            bench.stop_control_plane()
        warnings = [
            line
            for line in bench.log.read_text(errors="replace").splitlines()
            if " WARNING " in line or " ERROR " in line or "Traceback" in line
        ]
        return Results(
            n=n,
            workers=workers,
            resources=resources,
            initial_s=initial_s,
            idle=idle,
            subscribed=subscribed,
            peak=final["VmHWM"],
            changes=done,
            acked=acked,
            on_last=on_last,
            dataplanes_s=dataplanes_s,
            reconnects=bench.reconnects,
            push_kb=push_kb,
            server_ack=_histogram(metrics, "meshlib_controlplane_push_to_ack_seconds"),
            log_warnings=warnings,
        )


def _py_spy(pid: int, path: Path) -> subprocess.Popen[bytes]:
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        raise SystemExit("--profile needs py-spy in the venv: .venv/bin/pip install py-spy")
    cmd = [str(spy), "record", "--pid", str(pid), "--rate", "200", "--format", "speedscope", "-o", str(path)]
    proc = subprocess.Popen([*cmd, "--nonblocking"], stdout=subprocess.DEVNULL)
    time.sleep(0.5)  # attached before the first subscriber
    return proc


async def _push_sizes(client: Any, url: str, tokens: dict[str, str]) -> dict[str, float]:
    """The size of one push (KB), smallest and largest over the workloads: one extra short-lived subscriber each."""
    sizes = []
    for w in WORKLOADS:
        params = {"node": f"size-{w}", "workload": w, "namespace": "default", "service_account": w}
        headers = {"authorization": f"Bearer {tokens[w]}"}
        async with client.stream("GET", f"{url}/v1/stream", params=params, headers=headers) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    sizes.append(len(line[5:].strip().encode()) / 1024)
                    break
    return {"min": min(sizes), "max": max(sizes)}


def _histogram(text: str, name: str) -> dict[str, float]:
    """``count``, ``sum`` and the cumulative ``le`` buckets of a Prometheus histogram in exposition text."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_count "):
            out["count"] = float(line.split()[-1])
        elif line.startswith(f"{name}_sum "):
            out["sum"] = float(line.split()[-1])
        elif line.startswith(f'{name}_bucket{{le="'):
            le = line.split('"')[1]
            out[f"le_{le}"] = float(line.split()[-1])
    return out


# -- the report ---------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _goal(met: bool) -> str:
    return "met" if met else "**not met**"


def table(res: Results) -> str:
    after = sorted(x for c in res.changes for x in c.after_return())
    before = sorted(x for c in res.changes for x in c.after_send())
    every = [c.after_return()[-1] for c in res.changes]
    p99 = pct(after, 0.99)
    rows = [
        ("ACK after the apply returned, p50", _ms(pct(after, 0.5)), "", ""),
        ("ACK after the apply returned, p99", _ms(p99), "≤ 1 s", _goal(p99 <= GOAL_P99)),
        ("ACK after the apply returned, max", _ms(after[-1]), "", ""),
        (
            "every data plane ACKed (after the apply returned), median / worst change",
            f"{_ms(statistics.median(every))} / {_ms(max(every))}",
            "",
            "",
        ),
        (
            "ACK after the apply was sent, p50 / p99 / max",
            f"{_ms(pct(before, 0.5))} / {_ms(pct(before, 0.99))} / {_ms(before[-1])}",
            "",
            "",
        ),
        ("the apply request itself, median", _ms(statistics.median(c.apply_s for c in res.changes)), "", ""),
        (
            "control plane answered every ACK (after the apply returned), median",
            _ms(statistics.median(c.all_recorded() for c in res.changes)),
            "",
            "",
        ),
        ("control plane CPU per change, median", _ms(statistics.median(c.cpu for c in res.changes)), "", ""),
        (f"all {res.n} subscribed and ACKed the initial version", f"{res.initial_s:.1f} s", "", ""),
        ("RSS idle, before any subscriber", f"{res.idle['VmRSS']:.0f} MB", "", ""),
        (
            f"RSS with {res.n} subscribed",
            f"{res.subscribed['VmRSS']:.0f} MB",
            "≤ 150 MB",
            _goal(res.subscribed["VmRSS"] <= GOAL_RSS_MB),
        ),
        ("RSS peak (VmHWM)", f"{res.peak:.0f} MB", "≤ 150 MB", _goal(res.peak <= GOAL_RSS_MB)),
    ]
    lines = [
        f"{res.n} data planes (10 workloads, {res.workers} subscriber processes), {res.resources} resources, "
        f"{len(res.changes)} changes; {machine()}",
        "",
        "| figure | value | goal | |",
        "| --- | ---: | --- | --- |",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
        "",
        "| change | version | apply | p50 | p99 | max (all ACKed) | last ACK answered | CPU |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, c in enumerate(res.changes, 1):
        a = c.after_return()
        lines.append(
            f"| {i} | {c.version} | {_ms(c.apply_s)} | {_ms(pct(a, 0.5))} | {_ms(pct(a, 0.99))} | {_ms(a[-1])} "
            f"| {_ms(c.all_recorded())} | {_ms(c.cpu)} |"
        )
    return "\n".join(lines)


def notes(res: Results) -> str:
    ack = res.server_ack
    within = ack.get("le_1.0", 0.0) / ack["count"] if ack.get("count") else float("nan")
    mean = ack["sum"] / ack["count"] if ack.get("count") else float("nan")
    per_dp = (res.subscribed["VmRSS"] - res.idle["VmRSS"]) * 1024 / res.n
    return (
        f"`GET /v1/dataplanes` after the last change: {res.acked} of {res.n} ACKED, {res.on_last} on the last "
        f"version (answered in {_ms(res.dataplanes_s)}). One push is {res.push_kb['min']:.1f} to "
        f"{res.push_kb['max']:.1f} KB of JSON depending on the workload. The control plane's own "
        f"`meshlib_controlplane_push_to_ack_seconds`: {ack.get('count', 0):.0f} ACKs, mean {_ms(mean)}, "
        f"{within:.1%} within 1 s. ACK connections reopened after the server closed them: {res.reconnects}. "
        f"Warnings or errors in the control plane's log: {len(res.log_warnings)}. Each subscribed data plane "
        f"costs the control plane {per_dp:.0f} KB of RSS ((RSS with {res.n} - idle) / {res.n})."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dataplanes", type=int, default=1000)
    parser.add_argument("--changes", "--rounds", type=int, default=5, help="changes applied (default %(default)s)")
    parser.add_argument("--workers", type=int, default=4, help="subscriber processes")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 100 data planes, 2 changes, nothing written")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between changes (default %(default)s)")
    parser.add_argument("--profile", metavar="PATH", help="py-spy the control plane into this speedscope file")
    parser.add_argument("--worker", metavar="JOB", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.changes < 1 or args.dataplanes < 1 or args.workers < 1:
        parser.error("--changes, --dataplanes and --workers must be at least 1")
    n, changes, workers = (100, 2, 2) if args.quick else (args.dataplanes, args.changes, args.workers)
    import uvloop

    profile = Path(args.profile).resolve() if args.profile else None
    res = uvloop.run(measure(n, changes, workers, args.pause, profile))
    text = table(res)
    print(text, notes(res), sep="\n\n")
    for line in res.log_warnings[:10]:
        print(f"control plane log: {line}")
    if res.on_last != n:
        print(f"only {res.on_last} of {n} data planes show ACKED on the last version", file=sys.stderr)
        return 1
    if args.quick or args.no_write:
        return 0
    body = [
        "## Control plane push",
        "",
        f"`{Path(sys.argv[0]).name}` — `meshlib control-plane` in its own process (embedded file store, "
        f"plain HTTP on loopback) with {res.resources} resources; {n} data planes subscribed from {workers} "
        "subscriber processes (asyncio under uvloop, raw HTTP/1.1: an SSE stream and a kept-alive ACK connection "
        "each), spread over 10 workloads whose views differ. Each change is one `POST /v1/resources` rewriting a "
        "VirtualService every workload sees, so every data plane gets a push; a data plane ACKs each snapshot at "
        "once. Times are per data plane, from the apply request returning to its ACK being sent, pooled over "
        f"{len(res.changes)} changes. Reproduce with `.venv/bin/python benchmarks/controlplane.py`.",
        "",
        text,
        "",
        notes(res),
    ]
    write_section("controlplane", "\n".join(body), DOCS)
    print(f"wrote {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
