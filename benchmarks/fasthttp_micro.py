"""Micro-benchmark: httpx's default transport (httpcore) against meshlib's FastAsyncTransport.

One uvicorn server (httptools, uvloop, no access log) in a subprocess on loopback
answers a tiny GET; the client, under uvloop, sends 2,000 sequential GETs and
5,000 GETs 32 at a time with (a) ``httpx.AsyncClient()`` and (b)
``httpx.AsyncClient(transport=FastAsyncTransport())``, each workload on a fresh
client warmed with 200 requests the same way (httpcore slows down as its pool
grows, so a client warmed by the concurrent run would flatter nothing), and prints
p50/p99 latency, requests per second and the ratio b/a. Run from the repository root:

    .venv/bin/python benchmarks/fasthttp_micro.py [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import PAYLOAD, upstream
from benchmarks._harness import concurrent as _concurrent
from benchmarks._harness import sequential as _sequential
from meshlib.client._fasthttp import FastAsyncTransport

SEQUENTIAL = 2_000
CONCURRENT = 5_000
CONCURRENCY = 32
WARMUP = 200


async def sequential(client: httpx.AsyncClient, url: str, n: int) -> dict[str, float]:
    async def send() -> None:
        response = await client.get(url)
        assert response.content == PAYLOAD

    return await _sequential(send, n)


async def concurrent(client: httpx.AsyncClient, url: str, n: int, width: int) -> dict[str, float]:
    async def send() -> None:
        response = await client.get(url)
        assert response.content == PAYLOAD

    return await _concurrent(send, n, width)


def make_client(kind: str) -> httpx.AsyncClient:
    if kind == "httpx":
        return httpx.AsyncClient()
    return httpx.AsyncClient(transport=FastAsyncTransport())


async def run(url: str, rounds: int) -> dict[tuple[str, str], list[dict[str, float]]]:
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(rounds):  # interleave the two clients so drift hits both alike
        for kind in ("httpx", "fast"):
            async with make_client(kind) as client:  # a fresh client per workload, warmed the same way
                await sequential(client, url, WARMUP)
                results.setdefault((kind, "sequential"), []).append(await sequential(client, url, SEQUENTIAL))
            async with make_client(kind) as client:
                await concurrent(client, url, WARMUP, CONCURRENCY)
                results.setdefault((kind, "concurrent"), []).append(
                    await concurrent(client, url, CONCURRENT, CONCURRENCY)
                )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="repeat each measurement; the median round is shown")
    args = parser.parse_args()
    with upstream() as port:
        results = uvloop.run(run(f"http://127.0.0.1:{port}/", args.rounds))

    def median(kind: str, mode: str) -> dict[str, float]:
        rounds = results[(kind, mode)]
        return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}

    print(f"uvloop client, uvicorn(httptools, uvloop) server on loopback; median of {args.rounds} rounds")
    print(f"{'workload':<34}{'client':<22}{'p50 µs':>9}{'p99 µs':>9}{'req/s':>9}")
    for mode, label in (
        ("sequential", f"sequential {SEQUENTIAL} GETs"),
        ("concurrent", f"{CONCURRENCY}-concurrent {CONCURRENT} GETs"),
    ):
        a, b = median("httpx", mode), median("fast", mode)
        print(f"{label:<34}{'(a) httpx default':<22}{a['p50_us']:>9.0f}{a['p99_us']:>9.0f}{a['rps']:>9.0f}")
        print(f"{'':<34}{'(b) FastAsyncTransport':<22}{b['p50_us']:>9.0f}{b['p99_us']:>9.0f}{b['rps']:>9.0f}")
        print(
            f"{'':<34}{'ratio b/a':<22}{b['p50_us'] / a['p50_us']:>9.2f}{b['p99_us'] / a['p99_us']:>9.2f}"
            f"{b['rps'] / a['rps']:>9.2f}"
        )


if __name__ == "__main__":
    main()
