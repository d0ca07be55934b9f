"""Retry storm: an upstream failing every request must not be hammered, the breaker opens, and it heals.

The mesh runs its defaults (Istio's default retry: 2 retries on 503; the default
retry budget, 20 % of requests plus a reserve of 10 retries/s over 10 s = 100, at
most max(3, 20 % in flight) at once; the breaker: open after 7 consecutive failures,
1 s penalty then one half-open probe).
"""

from __future__ import annotations

import time

import httpx

import meshlib
from tests._upstreams import Upstream, service_entry, upstreams
from tests.reliability._chaos import record

HOST = "storm"
REQUESTS = 300
BUDGET_MINIMUM = 10 * 10 + 3  # the reserve (10 retries/s over the 10 s window) and minRetryConcurrency


def test_a_dead_upstream_gets_no_storm_the_breaker_opens_and_closes_when_it_heals() -> None:
    with upstreams(Upstream("dead", mode="fail", status=503)) as (upstream,):
        mesh = meshlib.Mesh.from_resources([service_entry(HOST, upstream)], workload="caller")
        outcomes: dict[str, int] = {}
        try:
            with mesh.client(timeout=5) as client:
                for _ in range(REQUESTS):
                    try:
                        r = client.get(f"http://{HOST}/")
                        key = str(r.status_code)
                    except httpx.HTTPError as exc:
                        key = type(exc).__name__
                    outcomes[key] = outcomes.get(key, 0) + 1
                attempts = upstream.hits
                # Every request failed, quickly, and the upstream saw no storm.
                assert outcomes.get("200", 0) == 0
                assert attempts <= 1.2 * REQUESTS + BUDGET_MINIMUM
                assert outcomes.get("CircuitOpenError", 0) > REQUESTS / 2  # fail fast, flag UO
                # Healing: nothing passes until the penalty is over; then one probe closes the breaker.
                upstream.mode = "ok"
                healed = time.monotonic()
                before = upstream.hits
                refused = 0
                while True:
                    try:
                        r = client.get(f"http://{HOST}/")
                        if r.status_code == 200:
                            break
                    except meshlib.CircuitOpenError:
                        refused += 1
                    assert time.monotonic() - healed < 70, "the breaker never let a probe through"
                    time.sleep(0.02)
                recovered = time.monotonic() - healed
                assert upstream.hits == before + 1  # the probe was the only attempt while open
                for _ in range(20):
                    assert client.get(f"http://{HOST}/").status_code == 200  # closed again
        finally:
            mesh.close()
        record(
            "retry storm",
            requests=REQUESTS,
            upstream_attempts=attempts,
            bound=1.2 * REQUESTS + BUDGET_MINIMUM,
            outcomes=outcomes,
            refused_while_open_after_heal=refused,
            recovery_seconds=round(recovered, 2),
        )
