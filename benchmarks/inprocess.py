"""In-process cost: bare httpx against the mesh client with the full client policy.

Two upstream processes on loopback serving the same app with uvicorn, one in plaintext
and one through ``meshlib.MeshServer`` (mTLS); the client under uvloop sends sequential
GETs and 32-concurrent GETs with each client in turn, interleaved over several
rounds (the median round is reported), each on a fresh client warmed the same way:

- ``httpx``: ``httpx.AsyncClient()``, the baseline;
- ``mesh / httpcore``: the mesh client wrapping httpx's own transport
  (``mesh.async_client(transport=httpx.AsyncHTTPTransport())``): the price of the policy;
- ``mesh``: the mesh client as shipped (its default inner transport);
- ``httpx / fast``: ``httpx.AsyncClient(transport=FastAsyncTransport())``, no mesh: the
  transport alone;
- ``mesh / httpcore + tracing`` and ``mesh + tracing``: the same two mesh clients with every
  request traced (MeshConfig ``tracing.sampling: 100``): a CLIENT span per request and one
  per attempt, recorded and handed to a ``BatchSpanProcessor`` whose exporter drops them
  (the cost of making and queueing spans, not of shipping them to a collector);
- ``mesh + mTLS``: the mesh client, same policy, to a second upstream process serving the
  same app through ``meshlib.MeshServer`` (PeerAuthentication STRICT); the endpoint is
  labelled ``security.istio.io/tlsMode: istio``, so the client speaks ISTIO_MUTUAL (auto
  mTLS) with a certificate from the CA the server's comes from;
- ``httpx + mTLS``: ``httpx.AsyncClient(verify=ctx)`` to that same server, no mesh, with a
  plain ``ssl`` context holding a workload certificate from that CA: httpx doing TLS itself.

Pooled rows reuse keep-alive connections (a handshake per connection, amortised); the
*new connection per request* rows send ``Connection: close`` on every request, so every
request pays TCP connect and, on the mTLS rows, the full handshake. The OpenSSL
handshake alone (both ends, in one process over memory BIOs, same certificates and
contexts) is timed too, to show what the handshake rows are made of.

The mesh policy is everything the client enforces: a VirtualService route with a
match, retries, route and per-try timeouts; a DestinationRule with LEAST_REQUEST,
connection-pool limits, outlier detection and a retry budget; a client-side
RateLimitPolicy; the default per-destination breaker. Metrics are on; the access log is
off; tracing is off (``sampling: 0``: the trace context is still propagated) but in the
``+ tracing`` rows. The CA reaches
the server process as Istio's plug-in CA folder (``ca.save``, ``CertificateAuthority.load``). Run:

    .venv/bin/python benchmarks/inprocess.py [--rounds 5] [--quick] [--no-write]

It prints the tables and writes them (and docs/img/inprocess.png, docs/img/inprocess-mtls.png
when matplotlib is installed) into docs/benchmarks.md, sections ``inprocess`` and
``inprocess-mtls``.
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import uvloop
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import (
    DOCS,
    MTLS_WORKLOAD,
    PAYLOAD,
    ROOT,
    concurrent,
    machine,
    median_round,
    sequential,
    upstream,
    write_section,
)
from meshlib import CertificateAuthority, Mesh, SpiffeId
from meshlib.client._fasthttp import FastAsyncTransport
from meshlib.engine import TLS_MODE_LABEL
from meshlib.security import IssuedCertificate, make_csr, new_private_key, server_context, write_files


def policy(port: int, mtls: bool = False, sampling: float = 0.0) -> list[dict[str, Any]]:
    """The full client policy for host ``bench``; ``mtls`` labels its endpoint for auto mTLS (ISTIO_MUTUAL).

    ``sampling`` is the percentage of requests traced.
    """
    labels = {"version": "v1", TLS_MODE_LABEL: "istio"} if mtls else {"version": "v1"}
    return [
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": "bench"},
            "spec": {
                "hosts": ["bench"],
                "location": "MESH_INTERNAL",
                "resolution": "STATIC",
                "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                "endpoints": [{"address": "127.0.0.1", "ports": {"http": port}, "labels": labels}],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "bench"},
            "spec": {
                "host": "bench",
                "trafficPolicy": {
                    "loadBalancer": {"simple": "LEAST_REQUEST"},
                    "connectionPool": {"tcp": {"maxConnections": 1000}, "http": {"http1MaxPendingRequests": 1000}},
                    "outlierDetection": {"consecutive5xxErrors": 5, "interval": "10s", "baseEjectionTime": "30s"},
                    "retryBudget": {"percent": 20, "minRetryConcurrency": 3},
                },
                "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "bench"},
            "spec": {
                "hosts": ["bench"],
                "http": [
                    {
                        "match": [{"uri": {"prefix": "/"}}],
                        "route": [{"destination": {"host": "bench", "subset": "v1"}}],
                        "timeout": "5s",
                        "retries": {"attempts": 2, "perTryTimeout": "2s", "retryOn": "5xx,reset,connect-failure"},
                    }
                ],
            },
        },
        {
            "apiVersion": "meshlib.io/v1alpha1",
            "kind": "RateLimitPolicy",
            "metadata": {"name": "bench"},
            "spec": {"side": "CLIENT", "host": "bench", "limits": [{"rate": "1000000/second"}]},
        },
        {
            "apiVersion": "meshlib.io/v1alpha1",
            "kind": "MeshConfig",
            "metadata": {"name": "mesh", "namespace": "istio-system"},
            "spec": {"tracing": {"sampling": sampling}, "accessLog": {"enabled": False}},
        },
    ]


class _Dropping(SpanExporter):
    """An exporter that accepts every batch and keeps nothing: spans made and queued, never shipped."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


CLIENTS: dict[str, str] = {
    "httpx": "httpx.AsyncClient()",
    "mesh / httpcore": "mesh client over httpx's transport",
    "mesh": "mesh client (default transport)",
    "httpx / fast": "httpx + FastAsyncTransport, no mesh",
    "mesh / httpcore + tracing": "mesh client over httpx's transport, every request traced",
    "mesh + tracing": "mesh client (default transport), every request traced",
    "mesh + mTLS": "mesh client, ISTIO_MUTUAL to a MeshServer (STRICT)",
    "httpx + mTLS": "httpx.AsyncClient(verify=<ssl context with a workload certificate>), same server",
}
PLAIN = ("httpx", "mesh / httpcore", "mesh", "httpx / fast", "mesh / httpcore + tracing", "mesh + tracing")
"""The clients of the plaintext table (and of docs/img/inprocess.png)."""
MTLS = ("httpx", "mesh", "mesh + mTLS", "httpx + mTLS")
"""The clients of the mTLS table, each pooled and with a new connection per request."""
NEW = "new connection"
MODES = ("sequential", "concurrent", f"sequential, {NEW}", f"concurrent, {NEW}")


Results = dict[tuple[str, str], dict[str, float]]


def clients_for(mode: str) -> tuple[str, ...]:
    return MTLS if mode.endswith(NEW) else tuple(CLIENTS)


def issue(ca: CertificateAuthority, account: str) -> tuple[Any, IssuedCertificate]:
    """A key and a workload certificate for ``account`` in the default namespace, signed by ``ca``."""
    identity = SpiffeId(f"spiffe://{ca.trust_domain}/ns/default/sa/{account}")
    key = new_private_key()
    return key, ca.sign(make_csr(identity, key), identity=identity)


def httpx_context(ca: CertificateAuthority, folder: Path) -> ssl.SSLContext:
    """A plain ``ssl`` client context with a workload certificate: what a user would hand httpx.

    The server's certificate names a SPIFFE id, not 127.0.0.1, so host names are not
    checked (the chain is); the mesh checks the SPIFFE id instead.
    """
    key, issued = issue(ca, "bench-httpx")
    write_files(str(folder), key, issued)
    context = ssl.create_default_context(cafile=str(folder / "root-cert.pem"))
    context.check_hostname = False
    context.load_cert_chain(folder / "cert-chain.pem", folder / "key.pem")
    return context


class Setup:
    """What the clients need: the plaintext and mTLS upstreams, a mesh for each, httpx's TLS context."""

    def __init__(self, port: int, tls_port: int, ca: CertificateAuthority, httpx_tls: ssl.SSLContext) -> None:
        self.port = port
        self.tls_port = tls_port
        self.mesh = Mesh.from_resources(policy(port), workload="bench-client")
        self.traced_mesh = Mesh.from_resources(policy(port, sampling=100.0), workload="bench-client")
        provider = self.traced_mesh.telemetry.tracing.provider
        assert isinstance(provider, TracerProvider)
        provider.add_span_processor(BatchSpanProcessor(_Dropping()))
        self.mtls_mesh = Mesh.from_resources(policy(tls_port, mtls=True), workload="bench-client", ca=ca)
        self.httpx_tls = httpx_tls
        key, issued = issue(ca, MTLS_WORKLOAD)
        self.server_tls = server_context(issued.chain_pem, key, issued.bundle_pem, {ca.trust_domain})
        """A server context built as MeshServer builds its own, for ``handshake_cpu``."""

    def close(self) -> None:
        self.mesh.close()
        self.traced_mesh.close()
        self.mtls_mesh.close()


def make(kind: str, mode: str, setup: Setup) -> tuple[httpx.AsyncClient, str]:
    """A fresh client of ``kind`` and the URL it sends to; in the new-connection modes, ``Connection: close``."""
    headers = {"connection": "close"} if mode.endswith(NEW) else None
    port = setup.port
    if kind == "httpx":
        return httpx.AsyncClient(headers=headers), f"http://127.0.0.1:{port}/"
    if kind == "mesh / httpcore":
        return setup.mesh.async_client(transport=httpx.AsyncHTTPTransport()), "http://bench/"
    if kind == "mesh":
        return setup.mesh.async_client(headers=headers), "http://bench/"
    if kind == "mesh / httpcore + tracing":
        return setup.traced_mesh.async_client(transport=httpx.AsyncHTTPTransport()), "http://bench/"
    if kind == "mesh + tracing":
        return setup.traced_mesh.async_client(headers=headers), "http://bench/"
    if kind == "mesh + mTLS":
        return setup.mtls_mesh.async_client(headers=headers), "http://bench/"
    if kind == "httpx + mTLS":
        return httpx.AsyncClient(verify=setup.httpx_tls, headers=headers), f"https://127.0.0.1:{setup.tls_port}/"
    return httpx.AsyncClient(transport=FastAsyncTransport()), f"http://127.0.0.1:{port}/"


async def measure(
    setup: Setup, rounds: int, sizes: dict[str, int], width: int, handshakes: int
) -> tuple[Results, dict[str, float]]:
    """Every client in every mode, interleaved, ``rounds`` times; the median round of each, and the CPU figures."""
    raw: dict[tuple[str, str], list[dict[str, float]]] = {}
    cpu: list[dict[str, float]] = []
    for _ in range(rounds):
        for kind in CLIENTS:
            for mode in MODES:
                if kind not in clients_for(mode):
                    continue
                client, url = make(kind, mode, setup)
                n = sizes[mode]
                async with client:

                    async def send(client: httpx.AsyncClient = client, url: str = url, kind: str = kind) -> None:
                        response = await client.get(url)
                        if response.status_code != 200 or response.content != PAYLOAD:
                            raise RuntimeError(f"{kind}: unexpected answer {response.status_code}")

                    if mode.startswith("sequential"):
                        await sequential(send, max(20, n // 10))
                        result = await sequential(send, n)
                    else:
                        await concurrent(send, max(20, n // 10), width)
                        result = await concurrent(send, n, width)
                raw.setdefault((kind, mode), []).append(result)
        # the handshake's CPU, in the same conditions as the rows (a process that has been under load)
        cpu.append({"handshake_us": handshake_cpu(setup, handshakes), "crypto_us": crypto_cpu(handshakes)})
    return {key: median_round(rounds_) for key, rounds_ in raw.items()}, median_round(cpu)


def handshake_cpu(setup: Setup, n: int) -> float:
    """Median µs of one TLS handshake, both ends in this process over memory BIOs: OpenSSL's work alone.

    The client context is the mesh client's own (its certificate, the SPIFFE peer
    check); the server context is built as MeshServer builds its own.
    """
    certificates = setup.mtls_mesh.certificates
    assert certificates is not None
    client_ctx = certificates.client_context(certificates.peer_check())
    server_ctx = setup.server_tls
    times = []
    for i in range(n + 10):  # the first 10 warm up
        c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname="bench")
        server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        t0 = time.perf_counter()
        done = {client: False, server: False}
        while not all(done.values()):
            for side, out, peer_in in ((client, c_out, s_in), (server, s_out, c_in)):
                if not done[side]:
                    try:
                        side.do_handshake()
                        done[side] = True
                    except ssl.SSLWantReadError:
                        pass
                peer_in.write(out.read())
        if i >= 10:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def crypto_cpu(n: int) -> float:
    """Median µs of the public-key arithmetic in one mutual TLS 1.3 handshake, timed with ``cryptography``.

    Two ECDSA P-256 signatures (each end's CertificateVerify), four verifications
    (each end checks the CA's signature on the peer's certificate and the peer's
    CertificateVerify) and an X25519 key agreement (a key pair and a derivation each end).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    data = b"x" * 130
    signature = key.sign(data, ec.ECDSA(hashes.SHA256()))
    public = key.public_key()
    times = []
    for i in range(n + 10):
        t0 = time.perf_counter()
        for _ in range(2):
            key.sign(data, ec.ECDSA(hashes.SHA256()))
        for _ in range(4):
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        a.exchange(b.public_key())
        b.exchange(a.public_key())
        if i >= 10:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def label(mode: str, sizes: dict[str, int], width: int) -> str:
    load = (
        f"sequential, {sizes[mode]} GETs"
        if mode.startswith("sequential")
        else f"{width} concurrent, {sizes[mode]} GETs"
    )
    return f"{load}, new connection per request" if mode.endswith(NEW) else load


def table(results: Results, modes: tuple[str, ...], kinds: tuple[str, ...], sizes: dict[str, int], width: int) -> str:
    """One row per (mode, client); the ratio is against pooled plaintext httpx under the same load."""
    lines = [
        "| workload | client | p50 µs | p99 µs | req/s | p50 vs httpx |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for mode in modes:
        base = results[("httpx", mode.split(",")[0])]
        text = label(mode, sizes, width)
        for kind in kinds:
            r = results[(kind, mode)]
            lines.append(
                f"| {text} | {kind} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['rps']:.0f} |"
                f" {r['p50_us'] / base['p50_us']:.2f}x |"
            )
            text = ""
    return "\n".join(lines)


def explain(results: Results, cpu: dict[str, float], width: int) -> str:
    """The paragraphs under the mTLS table, with this run's figures."""

    def p50(kind: str, mode: str) -> float:
        return results[(kind, mode)]["p50_us"]

    def rps(kind: str, mode: str) -> float:
        return results[(kind, mode)]["rps"]

    seq, conc, seq_new, conc_new = MODES
    handshake = p50("mesh + mTLS", seq_new) - p50("mesh", seq_new)
    openssl, arithmetic = cpu["handshake_us"], cpu["crypto_us"]
    pooled = (
        f"**Pooled, mTLS costs little next to the handshake.** A kept-alive connection pays its handshake once. "
        "After that, sequentially, "
        f"`mesh + mTLS` answers in {p50('mesh + mTLS', seq):.0f} µs at p50 against {p50('mesh', seq):.0f} µs for "
        f"plaintext `mesh` ({p50('mesh + mTLS', seq) - p50('mesh', seq):+.0f} µs a request; bare httpx: "
        f"{p50('httpx + mTLS', seq) - p50('httpx', seq):+.0f} µs), and at {width} concurrent it keeps "
        f"{rps('mesh + mTLS', conc) / rps('mesh', conc):.0%} of the plaintext throughput "
        f"({rps('mesh + mTLS', conc):.0f} against {rps('mesh', conc):.0f} req/s): still "
        f"{p50('mesh + mTLS', seq) / p50('httpx', seq):.2f}x and {p50('mesh + mTLS', conc) / p50('httpx', conc):.2f}x "
        "of bare plaintext httpx's p50. That per-request cost is not the cipher (AES-GCM over a few hundred bytes "
        "takes about a microsecond) but the TLS layer each side puts between socket and HTTP: uvloop's on the "
        "client, asyncio's pure-Python `SSLProtocol` in `MeshServer` (which sniffs the first byte, then switches "
        "the connection to TLS)."
    )
    fresh = (
        f"**The handshake is the price.** With a new connection per request, `mesh + mTLS` takes "
        f"{p50('mesh + mTLS', seq_new):.0f} µs at p50 against {p50('mesh', seq_new):.0f} µs for a new plaintext "
        f"connection: the full mutual TLS 1.3 handshake (no session resumption) adds {handshake:.0f} µs to every "
        f"connection. {'Most of it is' if openssl >= handshake / 2 else 'Part of it is'} OpenSSL's handshake work: "
        "both ends of one handshake, timed in one process over memory BIOs with the same contexts (the SPIFFE "
        f"peer check included; it is a few tens of µs), take {openssl:.0f} µs, {openssl / handshake:.0%} of the "
        "added time. Of those, the public-key arithmetic (an "
        f"ECDSA P-256 signature by each end for its CertificateVerify, four verifications as each end checks the "
        f"peer's certificate and signature, an X25519 key agreement; timed with `cryptography`) is only "
        f"{arithmetic:.0f} µs; the rest is OpenSSL's handshake machinery (parsing and decoding certificates, "
        f"building and checking chains, the key schedule, OpenSSL 3's allocations and locks)."
    )
    if handshake > openssl:
        fresh += (
            f" The other {handshake - openssl:.0f} µs are what surrounds it: the TLS layer on each side driving the "
            "handshake (asyncio's, in Python, on the server), its extra flights, each a wake-up of both event "
            "loops, and the TLS shutdown at close."
        )
    fresh += (
        f" Under {width}-concurrent load the handshakes are bound by CPU (client and server share the "
        f"machine): {rps('mesh + mTLS', conc_new):.0f} req/s against {rps('mesh', conc_new):.0f} for new plaintext "
        f"connections. Bare httpx pays the same kind of price: `httpx + mTLS` takes "
        f"{p50('httpx + mTLS', seq_new):.0f} µs with a new connection, "
        f"{p50('httpx + mTLS', seq_new) - p50('httpx', seq_new):.0f} µs more than plaintext. So keep connections "
        "pooled, as the mesh client does by default; `Connection: close` or a DestinationRule "
        "`maxRequestsPerConnection: 1` pays the handshake on every request."
    )
    if p50("httpx", conc_new) < p50("httpx", conc):
        fresh += (
            f" (Bare httpx's pool is slow at {width} concurrent, as in the table above, so its new-connection rows "
            "can beat its pooled ones.)"
        )
    return f"{pooled}\n\n{fresh}"


def plot(results: Results, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, mode in zip(axes, ("sequential", "concurrent"), strict=True):
        kinds = list(PLAIN)
        p50 = [results[(k, mode)]["p50_us"] for k in kinds]
        p99 = [results[(k, mode)]["p99_us"] for k in kinds]
        xs = range(len(kinds))
        ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], p99, width=0.4, label="p99")
        ax.set_xticks(list(xs), kinds, rotation=15, fontsize=8)
        ax.set_ylabel("latency (µs)")
        ax.set_title(mode)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_mtls(results: Results, path: Path) -> bool:
    """Sequential p50, pooled and with a new connection per request, plaintext and mTLS."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, mode in zip(axes, ("sequential", "concurrent"), strict=True):
        kinds = list(MTLS)
        xs = range(len(kinds))
        pooled = [results[(k, mode)]["p50_us"] for k in kinds]
        fresh = [results[(k, f"{mode}, {NEW}")]["p50_us"] for k in kinds]
        ax.bar([x - 0.2 for x in xs], pooled, width=0.4, label="pooled")
        ax.bar([x + 0.2 for x in xs], fresh, width=0.4, label="new connection per request")
        ax.set_xticks(list(xs), kinds, rotation=15, fontsize=8)
        ax.set_ylabel("p50 latency (µs)")
        ax.set_title(mode)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(rounds: int, sizes: dict[str, int], width: int, handshakes: int) -> tuple[Results, dict[str, float]]:
    """Start both upstreams (the mTLS one with the CA saved to a temporary folder) and measure."""
    ca = CertificateAuthority.create()
    with tempfile.TemporaryDirectory(prefix="meshlib-bench-") as tmp:
        ca.save(Path(tmp) / "ca")
        httpx_tls = httpx_context(ca, Path(tmp) / "httpx")
        with upstream() as port, upstream(ca_dir=Path(tmp) / "ca") as tls_port:
            setup = Setup(port, tls_port, ca, httpx_tls)
            try:
                results, cpu = uvloop.run(measure(setup, rounds, sizes, width, handshakes))
            finally:
                setup.close()
    return results, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests, one round, nothing written")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    if args.quick:
        rounds, counts, width, handshakes = 1, (50, 100, 20, 40), 8, 10
    else:
        rounds, counts, width, handshakes = args.rounds, (2000, 5000, 500, 1000), 32, 100
    sizes = dict(zip(MODES, counts, strict=True))
    results, cpu = run(rounds, sizes, width, handshakes)
    plain = table(results, MODES[:2], PLAIN, sizes, width)
    mtls = table(results, MODES, MTLS, sizes, width)
    print(
        plain,
        mtls,
        f"one mutual TLS handshake, both ends in one process over memory BIOs: {cpu['handshake_us']:.0f} µs; "
        f"its public-key arithmetic alone: {cpu['crypto_us']:.0f} µs",
        sep="\n\n",
    )
    if args.quick or args.no_write:
        return 0
    setting = (
        f"median of {rounds} interleaved rounds, client under uvloop, uvicorn upstreams (httptools, uvloop) "
        f"on loopback, each in its own process; {machine()}. Reproduce with `.venv/bin/python benchmarks/inprocess.py`."
    )
    image = ROOT / "docs" / "img" / "inprocess.png"
    has_plot = plot(results, image)
    body = [
        "## In-process client: bare httpx vs the mesh client",
        "",
        f"`{Path(sys.argv[0]).name}` — {setting}",
        "",
        plain,
        "",
        "The mesh rows carry the full client policy (route match, retries, timeouts, LEAST_REQUEST, pool limits, "
        "outlier detection, retry budget, breaker, client rate limit) and Istio's request metrics; no access log. "
        "Tracing is off (`sampling: 0`; the `traceparent` header is still sent) except in the `+ tracing` rows, "
        "where every request is sampled: a CLIENT span for the request and one for its attempt, batched to an "
        "exporter that drops them.",
    ]
    if has_plot:
        body += ["", "![in-process latency](img/inprocess.png)"]
    write_section("inprocess", "\n".join(body), DOCS)
    image = ROOT / "docs" / "img" / "inprocess-mtls.png"
    has_plot = plot_mtls(results, image)
    body = [
        "## In-process client over mTLS: pooled, and a handshake per request",
        "",
        f"`{Path(sys.argv[0]).name}` (the same run) — {setting}",
        "",
        "`mesh + mTLS` is the mesh client with the same policy, speaking ISTIO_MUTUAL (auto mTLS: the endpoint is "
        "labelled `security.istio.io/tlsMode: istio`) to the same app served by `meshlib.MeshServer` with "
        "PeerAuthentication STRICT; both certificates (EC P-256) come from one `CertificateAuthority`, which "
        "reaches the server process as Istio's plug-in CA folder. `httpx + mTLS` is bare "
        "`httpx.AsyncClient(verify=ctx)` to that server, `ctx` a plain `ssl` context with a workload certificate. "
        "The *new connection per request* rows send `Connection: close`, so each request pays TCP connect and, "
        "over mTLS, a full TLS 1.3 handshake; they send fewer requests. Ratios are against pooled plaintext "
        "`httpx` under the same load (sequential or concurrent).",
        "",
        mtls,
        "",
        explain(results, cpu, width),
    ]
    if has_plot:
        body += ["", "![in-process latency over mTLS](img/inprocess-mtls.png)"]
    write_section("inprocess-mtls", "\n".join(body), DOCS)
    print(f"wrote {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
