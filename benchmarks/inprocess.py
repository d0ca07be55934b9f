"""In-process cost: bare httpx against the mesh client with the full client policy.

One uvicorn upstream process on loopback; the client under uvloop sends sequential
GETs and 32-concurrent GETs with each client in turn, interleaved over several
rounds (the median round is reported), each on a fresh client warmed the same way:

- ``httpx``: ``httpx.AsyncClient()``, the baseline;
- ``mesh / httpcore``: the mesh client wrapping httpx's own transport
  (``mesh.async_client(transport=httpx.AsyncHTTPTransport())``): the price of the policy;
- ``mesh``: the mesh client as shipped (its default inner transport);
- ``httpx / fast``: ``httpx.AsyncClient(transport=FastAsyncTransport())``, no mesh: the
  transport alone.

The mesh policy is everything the client enforces: a VirtualService route with a
match, retries, route and per-try timeouts; a DestinationRule with LEAST_REQUEST,
connection-pool limits, outlier detection and a retry budget; a client-side
RateLimitPolicy; the default per-destination breaker. Tracing is off. Run:

    .venv/bin/python benchmarks/inprocess.py [--rounds 5] [--quick] [--no-write]

It prints the table and writes it (and docs/img/inprocess.png when matplotlib is
installed) into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import (
    DOCS,
    PAYLOAD,
    ROOT,
    concurrent,
    machine,
    median_round,
    sequential,
    upstream,
    write_section,
)
from meshlib import Mesh
from meshlib.client._fasthttp import FastAsyncTransport


def policy(port: int) -> list[dict[str, Any]]:
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
                "endpoints": [{"address": "127.0.0.1", "ports": {"http": port}, "labels": {"version": "v1"}}],
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
    ]


CLIENTS: dict[str, str] = {
    "httpx": "httpx.AsyncClient()",
    "mesh / httpcore": "mesh client over httpx's transport",
    "mesh": "mesh client (default transport)",
    "httpx / fast": "httpx + FastAsyncTransport, no mesh",
}


def make(kind: str, mesh: Mesh, port: int) -> tuple[httpx.AsyncClient, str]:
    if kind == "httpx":
        return httpx.AsyncClient(), f"http://127.0.0.1:{port}/"
    if kind == "mesh / httpcore":
        return mesh.async_client(transport=httpx.AsyncHTTPTransport()), "http://bench/"
    if kind == "mesh":
        return mesh.async_client(), "http://bench/"
    return httpx.AsyncClient(transport=FastAsyncTransport()), f"http://127.0.0.1:{port}/"


async def measure(
    port: int, rounds: int, n_seq: int, n_conc: int, width: int
) -> dict[tuple[str, str], dict[str, float]]:
    mesh = Mesh.from_resources(policy(port), workload="bench-client")
    raw: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(rounds):
        for kind in CLIENTS:
            for mode in ("sequential", "concurrent"):
                client, url = make(kind, mesh, port)
                async with client:

                    async def send(client: httpx.AsyncClient = client, url: str = url, kind: str = kind) -> None:
                        response = await client.get(url)
                        if response.status_code != 200 or response.content != PAYLOAD:
                            raise RuntimeError(f"{kind}: unexpected answer {response.status_code}")

                    if mode == "sequential":
                        await sequential(send, max(20, n_seq // 10))
                        result = await sequential(send, n_seq)
                    else:
                        await concurrent(send, max(20, n_conc // 10), width)
                        result = await concurrent(send, n_conc, width)
                raw.setdefault((kind, mode), []).append(result)
    return {key: median_round(rounds_) for key, rounds_ in raw.items()}


def table(results: dict[tuple[str, str], dict[str, float]], n_seq: int, n_conc: int, width: int) -> str:
    lines = [
        "| workload | client | p50 µs | p99 µs | req/s | p50 vs httpx |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for mode, label in (
        ("sequential", f"sequential, {n_seq} GETs"),
        ("concurrent", f"{width} concurrent, {n_conc} GETs"),
    ):
        base = results[("httpx", mode)]
        for kind in CLIENTS:
            r = results[(kind, mode)]
            lines.append(
                f"| {label} | {kind} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['rps']:.0f} |"
                f" {r['p50_us'] / base['p50_us']:.2f}x |"
            )
            label = ""
    return "\n".join(lines)


def plot(results: dict[tuple[str, str], dict[str, float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, mode in zip(axes, ("sequential", "concurrent"), strict=True):
        kinds = list(CLIENTS)
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
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests, one round, nothing written")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    rounds, n_seq, n_conc, width = (args.rounds, 2000, 5000, 32) if not args.quick else (1, 50, 100, 8)
    with upstream() as port:
        results: dict[tuple[str, str], dict[str, float]] = uvloop.run(measure(port, rounds, n_seq, n_conc, width))
    text = table(results, n_seq, n_conc, width)
    print(text)
    if args.quick or args.no_write:
        return 0
    image = ROOT / "docs" / "img" / "inprocess.png"
    has_plot = plot(results, image)
    body = [
        "## In-process client: bare httpx vs the mesh client",
        "",
        f"`{Path(sys.argv[0]).name}` — median of {rounds} interleaved rounds, client under uvloop, one uvicorn "
        f"upstream (httptools, uvloop) on loopback; {machine()}. Reproduce with "
        "`.venv/bin/python benchmarks/inprocess.py`.",
        "",
        text,
        "",
        "The mesh rows carry the full client policy (route match, retries, timeouts, LEAST_REQUEST, pool limits, "
        "outlier detection, retry budget, breaker, client rate limit); tracing off.",
    ]
    if has_plot:
        body += ["", "![in-process latency](img/inprocess.png)"]
    write_section("inprocess", "\n".join(body), DOCS)
    print(f"wrote {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
