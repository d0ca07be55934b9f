"""Driving traffic and keeping every answer, so each figure the demo prints is counted from real responses."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from ..client._common import FLAGS_EXTENSION
from ._progress import Progress

__all__ = ["Reply", "failures", "percentile", "send", "statuses", "timed"]

FLAGS_HEADER = "x-meshlib-response-flags"


@dataclass(frozen=True)
class Reply:
    """One request as the caller saw it. ``status`` 0: no HTTP answer (``error`` says why)."""

    status: int
    seconds: float
    data: dict[str, Any] | None = None
    flags: str = ""
    text: str = ""
    error: str | None = None
    retry_after: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def _reply(response: httpx.Response, seconds: float) -> Reply:
    data: dict[str, Any] | None = None
    if response.headers.get("content-type", "").startswith("application/json"):
        try:
            parsed = response.json()
        except ValueError:
            parsed = None
        data = parsed if isinstance(parsed, dict) else None
    flags = str(response.extensions.get(FLAGS_EXTENSION) or response.headers.get(FLAGS_HEADER) or "")
    retry_after = response.headers.get("retry-after", "")
    return Reply(response.status_code, seconds, data, flags, response.text[:300], retry_after=retry_after)


async def timed(request: Callable[[int], Awaitable[httpx.Response]], i: int = 0) -> Reply:
    """One request, timed from the call to the whole body read; a transport error is a Reply with status 0."""
    start = time.perf_counter()
    try:
        response = await request(i)
        return _reply(response, time.perf_counter() - start)
    except httpx.HTTPError as exc:
        return Reply(0, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")


async def send(
    label: str,
    count: int,
    request: Callable[[int], Awaitable[httpx.Response]],
    *,
    concurrency: int = 8,
    progress: bool = True,
) -> list[Reply]:
    """``count`` requests (``request(i)`` makes the i-th), ``concurrency`` at a time; replies in order."""
    replies: list[Reply | None] = [None] * count
    bar = Progress(label, count) if progress else None
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:  # shared iterator: each index is taken once
            replies[i] = reply = await timed(request, i)
            if bar is not None:
                bar.advance(reply.ok)

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, count)))))
    finally:
        if bar is not None:
            bar.close()
    return [r for r in replies if r is not None]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def statuses(replies: Iterable[Reply]) -> dict[str, int]:
    """How many replies had each status (``"error"`` for no HTTP answer), most common first."""
    counts = Counter(str(r.status) if r.status else "error" for r in replies)
    return dict(counts.most_common())


def failures(replies: Iterable[Reply], limit: int = 3) -> list[str]:
    """The first few replies that were not 2xx, as ``status: text`` (for a FAILED reason, or the JSON)."""
    out = []
    for r in replies:
        if not r.ok:
            out.append(f"{r.status or 'error'} {r.flags}: {r.error or r.text}".replace("\n", " ")[:300])
            if len(out) >= limit:
                break
    return out
