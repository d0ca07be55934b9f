"""Two replicas of ``orders``, one rate limit: a GLOBAL RateLimitPolicy counting in Redis.

Run it from the repository root (with the venv active)::

    python examples/global_rate_limit/run.py

It uses the Redis at ``REDIS_URL`` if set, else starts ``redis-server`` on a free
loopback port (and stops it at the end). It starts two replicas (``replica.py``,
separate processes), sends 40 requests for one tenant, alternating between them,
and prints what each answered: the policy allows 20 a minute per tenant, and the two
replicas together let exactly 20 through.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

HERE = Path(__file__).resolve().parent
REQUESTS = 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(ready: Callable[[], bool], what: str, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    limit = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > limit:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.05)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def main() -> int:
    started: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            redis_url = os.environ.get("REDIS_URL")
            if redis_url:
                if not pings(redis_url):
                    raise SystemExit(f"REDIS_URL={redis_url}: Redis does not answer")
                print(f"redis: {redis_url} (REDIS_URL)")
            else:
                binary = shutil.which("redis-server")
                if binary is None:
                    raise SystemExit("redis-server is not installed: install it, or set REDIS_URL to a Redis")
                port = free_port()
                redis_url = f"redis://127.0.0.1:{port}/0"
                server = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
                started.append(subprocess.Popen([*server, "--dir", tmp], stdout=subprocess.DEVNULL))
                wait_until(lambda: pings(redis_url), "redis-server", started[-1])
                print(f"redis: started redis-server on 127.0.0.1:{port} (set REDIS_URL to use your own)")

            replicas = {"a": free_port(), "b": free_port()}
            for name, port in replicas.items():
                command = [sys.executable, str(HERE / "replica.py"), "--name", name, "--port", str(port)]
                started.append(subprocess.Popen([*command, "--redis", redis_url]))
            for (name, port), process in zip(replicas.items(), started[-2:], strict=True):
                wait_until(lambda port=port: answers(f"http://127.0.0.1:{port}/health"), f"replica {name}", process)
            print(", ".join(f"replica {n} on 127.0.0.1:{p}" for n, p in replicas.items()) + ": one policy, one Redis")

            # A tenant of its own for this run, so a Redis kept between runs starts it at zero.
            tenant = f"acme-{secrets.token_hex(2)}"
            statuses = {name: Counter[int]() for name in replicas}
            refusal = None
            with httpx.Client(trust_env=False, timeout=5) as client:
                for i in range(REQUESTS):
                    name = "ab"[i % 2]
                    r = client.get(f"http://127.0.0.1:{replicas[name]}/orders/{i}", headers={"x-tenant": tenant})
                    statuses[name][r.status_code] += 1
                    if r.status_code == 429 and refusal is None:
                        refusal = r
            print(f"{REQUESTS} requests for tenant {tenant}, alternating between the replicas (limit 20/minute):")
            for name, counts in statuses.items():
                print(f"  replica {name}: " + ", ".join(f"{n} x {s}" for s, n in sorted(counts.items())))
            allowed = sum(c[200] for c in statuses.values())
            print(f"  together: {allowed} x 200, the tenant's limit (with a LOCAL backend each replica would allow 20)")
            if refusal is not None:
                head = ", ".join(f"{h}: {refusal.headers[h]}" for h in ("retry-after", "x-ratelimit-limit"))
                print(f"a refusal: {refusal.status_code} {refusal.text!r} ({head})")
        finally:
            for process in reversed(started):
                process.terminate()
                process.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
