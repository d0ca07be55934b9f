"""The demo's traffic steps: a canary shifted live, a failing instance, injected faults, and latency.

Each step explains itself, changes the mesh live through the control plane's API,
measures from real answers, and checks what it measured (see ``_context``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from ..mesh import Mesh
from ._context import Context, fqdn, tolerance
from ._progress import Progress
from ._report import StepResult, Table, ms, pct
from ._resources import NAMESPACE, orders_faults, payments_route
from ._shop import Shop
from ._traffic import Reply, failures, percentile, send, statuses, timed

__all__ = ["CANARY", "FAILOVER", "FAULTS", "LATENCY", "canary", "failover", "faults", "latency"]


# -- 2. canary -------------------------------------------------------------------------

CANARY = """
payments v2 is rolled out as a canary: its VirtualService sends 5% of the calls to v2,
then 50%, then all of them. Each change is one POST to the control plane's
/v1/resources; the control plane pushes it to orders (the caller, which does the
routing), and the demo waits for orders' ACK before it sends traffic. The split is
measured from the answers, each of which names the payments version that served it.
"""


async def canary(ctx: Context, step: StepResult) -> None:
    api = ctx.shop.api()
    rows = []
    phases = []
    n = ctx.n(400)
    for v1, v2 in ((95, 5), (50, 50), (0, 100)):
        change = await api.apply(f"payments v1 {v1}% / v2 {v2}%", [payments_route({"v1": v1, "v2": v2})], ["orders"])
        step.changes.append(change.describe())
        replies = await send(f"canary v1 {v1} / v2 {v2}", n, ctx.order)
        versions = Counter(str((r.data or {}).get("payment", {}).get("version")) for r in replies if r.ok)
        good = sum(versions.values())
        share = versions.get("v2", 0) / good if good else 0.0
        allowed = tolerance(v2 / 100, good)
        rows.append(
            [
                f"{v1}/{v2}",
                str(len(replies)),
                pct(versions.get("v1", 0), good),
                pct(versions.get("v2", 0), good),
                f"±{allowed:.1f}",
                str(len(replies) - good),
                str(change.version),
                f"{change.ack_seconds * 1000:.0f} ms",
            ]
        )
        phases.append(
            {
                "weights": {"v1": v1, "v2": v2},
                "requests": len(replies),
                "succeeded": good,
                "counts": dict(versions),
                "measured_percent": {"v1": round(100 - share * 100, 2), "v2": round(share * 100, 2)},
                "tolerance_points": round(allowed, 2),
                "statuses": statuses(replies),
                **change.to_dict(),
            }
        )
        step.check(good == len(replies), f"{len(replies) - good} of {len(replies)} orders failed at {v1}/{v2}")
        gap = abs(share * 100 - v2)
        step.check(gap <= allowed, f"at {v1}/{v2} v2 got {share * 100:.1f}% (allowed ±{allowed:.1f} points)")
    step.tables.append(
        Table(["weights v1/v2", "orders", "v1 measured", "v2 measured", "allowed", "failed", "version", "ACK"], rows)
    )
    step.figures = {"phases": phases}
    step.summary = "v1/v2 set -> measured: " + ", ".join(f"{r[0]} -> {r[2]}/{r[3]}" for r in rows)


# -- 3. a failing instance ----------------------------------------------------------------

FAILOVER = """
Traffic goes back to payments v1 in one call (POST /v1/rollback to version 1, the
control plane's history), and one of its two instances, payments-v1-b, starts
answering half of its payments with 503. Each payment is a PUT keyed by the order, so
orders' client retries it on the other instance (payments' retry budget lets at most
20% of the requests in flight, and at least 10, be retries: enough here, yet no retry
storm when all of payments is down); and payments' DestinationRule has outlier
detection (3 consecutive 5xx eject an endpoint for 30 s), so the failing instance is
soon taken out of the pool altogether. The customer-facing success rate
is counted at frontend; retries and ejections are read from orders' engines.
"""


@dataclass(frozen=True)
class _Engines:
    retries: int
    refused: int
    ejections: int
    ejected: list[str]


def _payments_engines(mesh: Mesh, shop: Shop) -> _Engines:
    """Retries (and those the retry budget refused), ejections, and the instances ejected now, of payments' clusters."""
    retries = refused = ejections = 0
    ejected: list[str] = []
    now = time.monotonic()
    for dest in list(mesh.outbound.destinations.values()):
        if dest.host != fqdn("payments"):
            continue
        retries += dest.counters.retries
        refused += dest.counters.retry_budget_exhausted
        ejections += dest.counters.ejections
        for key in sorted(dest.outlier.ejected(now)):
            name = shop.instance_at(dest.targets[key][1])
            if name not in ejected:
                ejected.append(name)
    return _Engines(retries, refused, ejections, ejected)


async def failover(ctx: Context, step: StepResult) -> None:
    shop = ctx.shop
    orders = shop.mesh("orders")
    change = await shop.api().rollback("rollback to version 1: payments all on v1", shop.base_version, ["orders"])
    step.changes.append(change.describe())
    apps = {i.name: i.app for i in shop.payments()}
    before = {name: (app.served, app.failed) for name, app in apps.items()}
    start = _payments_engines(orders, shop)
    bad = apps["payments-v1-b"]
    ejection: dict[str, float] = {}

    async def watch() -> None:  # when was it ejected, and after how many of its answers?
        began = time.monotonic()
        while "payments-v1-b" not in _payments_engines(orders, shop).ejected:
            await asyncio.sleep(0.002)
        ejection.update(ms=(time.monotonic() - began) * 1000, attempts=bad.served - before["payments-v1-b"][0])

    watcher = asyncio.create_task(watch())
    bad.fail_rate = 0.5
    try:
        replies = await send("payments-v1-b failing 50%", ctx.n(1000), ctx.order)
    finally:
        bad.fail_rate = 0.0
        watcher.cancel()
    end = _payments_engines(orders, shop)
    retries, refused, ejections = (
        end.retries - start.retries,
        end.refused - start.refused,
        end.ejections - start.ejections,
    )
    total = len(replies)
    good = sum(r.ok for r in replies)
    rate = good / total if total else 0.0
    rows = []
    for name, app in apps.items():
        served, failed = app.served - before[name][0], app.failed - before[name][1]
        state = "in the pool"
        if name in end.ejected:
            state = "ejected"
            if name == "payments-v1-b" and ejection:
                state += f" (at its attempt {ejection['attempts']:.0f}, {ejection['ms']:.0f} ms into the step)"
        rows.append([name, str(served), str(failed), state])
    step.tables.append(Table(["payments instance", "attempts served", "503s answered", "now"], rows))
    bad_503s = bad.failed - before["payments-v1-b"][1]
    ejected = ", ".join(end.ejected) or "none"
    step.tables.append(
        Table(
            ["orders", "succeeded", "success rate", "retries", "refused by budget", "ejections", "ejected"],
            [[str(total), str(good), f"{100 * rate:.2f}%", str(retries), str(refused), str(ejections), ejected]],
        )
    )
    step.figures = {
        "requests": total,
        "succeeded": good,
        "success_rate": rate,
        "statuses": statuses(replies),
        "failures": failures(replies),
        "retries": retries,
        "retries_refused_by_budget": refused,
        "ejections": ejections,
        "ejected": end.ejected,
        "failing_instance": "payments-v1-b",
        "failing_instance_503s": bad_503s,
        "per_instance": {r[0]: {"served": int(r[1]), "failed": int(r[2])} for r in rows},
        "ejected_after": ejection or None,
        "change": change.to_dict(),
    }
    step.check(rate >= 0.999, f"success rate {100 * rate:.2f}% < 99.9%: {failures(replies)}")
    step.check("payments-v1-b" in end.ejected, f"payments-v1-b was not ejected (ejected: {ejected})")
    healthy = sorted(set(end.ejected) - {"payments-v1-b"})
    step.check(not healthy, f"healthy instances were ejected: {healthy}")
    step.check(bad_503s > 0 and retries > 0, "the failing instance was never hit, or nothing was retried")
    step.summary = f"{100 * rate:.2f}% of {total} orders succeeded, {bad_503s} 503s retried, ejected: {ejected}"


# -- 6. fault injection -------------------------------------------------------------------

ABORT_PERCENT, DELAY_PERCENT, DELAY = 10, 20, 0.2
FAULTS = f"""
A VirtualService for orders injects faults the way Istio does, to test how callers
cope before production does it for you: {ABORT_PERCENT}% of the requests are answered
503 at once (response flag FI: nothing reaches orders) and {DELAY_PERCENT}% are held
for {DELAY * 1000:.0f} ms first. The faults are decided in frontend's client (the caller
applies its routes), and counted from the answers and their timings. The VirtualService
is deleted afterwards.
"""


async def faults(ctx: Context, step: StepResult) -> None:
    api = ctx.shop.api()
    fault = orders_faults(ABORT_PERCENT, 503, DELAY_PERCENT, f"{DELAY * 1000:.0f}ms")
    change = await api.apply("VirtualService orders-faults", [fault], ["frontend"])
    step.changes.append(change.describe())
    try:
        replies = await send("orders with faults injected", ctx.n(400), ctx.order, concurrency=8)
    finally:
        removed = await api.delete("delete it", f"VirtualService/{NAMESPACE}/orders-faults", ["frontend"])
    step.changes.append(removed.describe())
    total = len(replies)
    aborted = [r for r in replies if r.status == 503 and "FI" in r.flags]
    rest = [r for r in replies if not (r.status == 503 and "FI" in r.flags)]
    delayed = [r for r in replies if r.seconds >= DELAY * 0.95]  # an order takes a few ms; a held one, DELAY more
    prompt = [r for r in replies if r.seconds < DELAY * 0.95]
    others = [r for r in rest if not r.ok]
    abort_tol = tolerance(ABORT_PERCENT / 100, total)
    delay_tol = tolerance(DELAY_PERCENT / 100, total)
    step.tables.append(
        Table(
            ["fault", "set", "measured", "allowed", "latency p50 of those", "of the others"],
            [
                [
                    "abort 503 (FI)",
                    f"{ABORT_PERCENT}%",
                    f"{pct(len(aborted), total)} ({len(aborted)}/{total})",
                    f"±{abort_tol:.1f}",
                    ms(percentile([r.seconds for r in aborted], 50)),
                    ms(percentile([r.seconds for r in rest], 50)),
                ],
                [
                    f"delay {DELAY * 1000:.0f} ms",
                    f"{DELAY_PERCENT}%",
                    f"{pct(len(delayed), total)} ({len(delayed)}/{total})",
                    f"±{delay_tol:.1f}",
                    ms(percentile([r.seconds for r in delayed], 50)),
                    ms(percentile([r.seconds for r in prompt], 50)),
                ],
            ],
        )
    )
    abort_share, delay_share = 100 * len(aborted) / total, 100 * len(delayed) / total
    step.figures = {
        "requests": total,
        "abort": {"set_percent": ABORT_PERCENT, "measured_percent": round(abort_share, 2), "count": len(aborted)},
        "delay": {
            "set_percent": DELAY_PERCENT,
            "seconds": DELAY,
            "measured_percent": round(delay_share, 2),
            "count": len(delayed),
        },
        "tolerance_points": {"abort": round(abort_tol, 2), "delay": round(delay_tol, 2)},
        "statuses": statuses(replies),
        "failures": failures(others),
        "changes": [change.to_dict(), removed.to_dict()],
    }
    step.check(abs(abort_share - ABORT_PERCENT) <= abort_tol, f"aborted {abort_share:.1f}%, set {ABORT_PERCENT}%")
    step.check(abs(delay_share - DELAY_PERCENT) <= delay_tol, f"delayed {delay_share:.1f}%, set {DELAY_PERCENT}%")
    step.check(not others, f"answers that were neither injected nor 2xx: {statuses(others)}")
    step.summary = (
        f"aborted {abort_share:.1f}% (set {ABORT_PERCENT}%), delayed {delay_share:.1f}% (set {DELAY_PERCENT}%)"
    )


# -- 7. latency -------------------------------------------------------------------------

LATENCY = """
The same ledger app, called three ways by the same client (orders' mesh client, one
call at a time, rounds interleaved, after a warm-up): straight at the app's port, which
is not a mesh host, so the client passes it through with no policy and no TLS (the
baseline); in-process, where the app is served by meshlib.serve with MeshMiddleware in
its own process (here, the demo's); and through the sidecar, where the unchanged app
sits behind `meshlib sidecar` in another process. Both mesh rows pay for mTLS, routing,
the caller's and the callee's policy and metrics; the sidecar adds one loopback hop.
"""


async def latency(ctx: Context, step: StepResult) -> None:
    shop = ctx.shop
    rounds, per_round, warmup = 6, max(10, ctx.n(50)), 30
    client = ctx.orders
    modes: dict[str, Callable[[int], Awaitable[httpx.Response]]] = {
        "direct to the app (no mesh policy, plaintext)": lambda i: client.get(
            f"http://127.0.0.1:{shop.ledger_port}/entries"
        ),
        "in-process (MeshMiddleware, mTLS)": lambda i: client.get("http://ledger-in-process/entries"),
        "via meshlib sidecar (mTLS, one more hop)": lambda i: client.get("http://ledger/entries"),
    }
    samples: dict[str, list[Reply]] = {mode: [] for mode in modes}
    for mode, call in modes.items():
        await send(f"warm-up {mode}", warmup, call, concurrency=1, progress=False)
    bar = Progress("latency, one call at a time", rounds * per_round * len(modes))
    try:
        for _ in range(rounds):
            for mode, call in modes.items():
                for i in range(per_round):
                    reply = await timed(call, i)
                    samples[mode].append(reply)
                    bar.advance(reply.ok)
    finally:
        bar.close()
    rows = []
    figures = []
    base = percentile([x.seconds for x in samples[next(iter(modes))]], 50)
    for mode, replies in samples.items():
        times = [x.seconds for x in replies if x.ok]
        p50, p90, p99 = (percentile(times, q) for q in (50, 90, 99))
        rows.append([mode, str(len(replies)), ms(p50), ms(p90), ms(p99), f"{(p50 - base) * 1000:+.2f} ms"])
        figures.append(
            {
                "mode": mode,
                "calls": len(replies),
                "ok": len(times),
                "p50_ms": round(p50 * 1000, 3),
                "p90_ms": round(p90 * 1000, 3),
                "p99_ms": round(p99 * 1000, 3),
            }
        )
        step.check(len(times) == len(replies), f"{mode}: {statuses(replies)} {failures(replies)}")
    step.tables.append(Table(["the ledger app, called", "calls", "p50", "p90", "p99", "p50 vs direct"], rows))
    step.figures = {"modes": figures}
    inproc, sidecar = rows[1], rows[2]  # the table's own figures, so the two never round apart
    step.summary = f"p50/p99 in-process {inproc[2]} / {inproc[4]}, via the sidecar {sidecar[2]} / {sidecar[4]}"
