"""The demo's security steps: who is who (mTLS identities), who may call whom (authorization), how often (rate limits).

Each step explains itself, changes the mesh live through the control plane's API,
measures from real answers, and checks what it measured (see ``_context``).
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from ._context import Context
from ._report import StepResult, Table
from ._resources import NAMESPACE, deny_frontend_to_ledger, orders_rate_limit
from ._shop import Shop
from ._traffic import Reply, send, statuses

__all__ = ["AUTHZ", "IDENTITIES", "RATE_LIMIT", "authorization", "identities", "rate_limit"]


# -- 1. identities -----------------------------------------------------------------------

IDENTITIES = """
Every workload got its identity from the control plane: it sent a certificate signing
request with its bootstrap token, and the control plane's CA signed a short-lived
certificate naming it by SPIFFE id. The shop's PeerAuthentication is STRICT, so every
hop below is mutual TLS and each side checks the other's id in the handshake. The
table lists the data planes the control plane sees (GET /v1/dataplanes) with the
configuration version each has ACKed; the one below it is one real order, showing the
caller identity each callee verified, and two plaintext calls the mesh refuses.
"""


async def identities(ctx: Context, step: StepResult) -> None:
    version = await ctx.shop.api().version()
    rows, planes = await _dataplanes(ctx.shop)
    step.tables.append(
        Table(
            ["instance", "runs", "SPIFFE id (mTLS identity)", "labels", "certificate expires", "ACKed", "state"],
            rows,
            title=f"Data planes (control plane version {version})",
        )
    )
    expected = {*ctx.shop.instances, "ledger"}
    names = {r[0] for r in rows}
    step.check(expected <= names, f"data planes missing: {sorted(expected - names)}")
    not_acked = [r[0] for r in rows if r[6] != "ACKED"]
    step.check(not not_acked, f"not ACKED: {not_acked}")
    proofs = await _one_order(ctx, step)
    refused = await _plaintext(ctx, step, proofs)
    step.tables.append(Table(["caller", "callee", "identity the callee verified", "how"], proofs))
    step.figures = {"config_version": version, "dataplanes": planes, "proofs": proofs, "plaintext_refused": refused}
    step.summary = f"{len(rows)} data planes ACKED v{version}, each hop's caller verified, plaintext refused"


async def _dataplanes(shop: Shop) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """The control plane's data planes, named by the demo's instances, with each certificate's expiry."""
    by_node = {i.mesh.agent.node: i for i in shop.instances.values() if i.mesh.agent is not None}
    sidecar_cert = (await shop.sidecar_config()).get("certificate") or {}
    rows, planes = [], []
    for plane in await shop.api().dataplanes():
        instance = by_node.get(plane["node"])
        expires: float | None = None
        if instance is not None:
            name, runs = instance.name, "in-process"
            certs = instance.mesh.certificates
            expires = certs.issued.not_after if certs is not None else None
        elif plane["workload"] == "ledger" and shop.sidecar is not None:
            name, runs = "ledger", f"meshlib sidecar (pid {shop.sidecar.pid})"
            expires = sidecar_cert.get("not_after")
        else:
            name, runs = plane["node"], "?"
        spiffe = f"spiffe://cluster.local/ns/{plane['namespace']}/sa/{plane['service_account']}"
        when = "-"
        if expires:
            stamp = time.strftime("%Y-%m-%d %H:%MZ", time.gmtime(expires))
            when = f"{stamp} (in {(expires - time.time()) / 3600:.1f} h)"
        labels = ",".join(f"{k}={v}" for k, v in sorted(plane["labels"].items()))
        rows.append([name, runs, spiffe, labels, when, str(plane.get("acked_version")), plane["state"]])
        planes.append({"instance": name, "runs": runs, "spiffe_id": spiffe, "cert_not_after": expires, **plane})
    rows.sort(key=lambda r: r[0])
    return rows, planes


async def _one_order(ctx: Context, step: StepResult) -> list[list[str]]:
    """One order end to end, and the caller identity each callee verified on its way."""
    reply = await ctx.order(0)
    if not step.check(reply.status_code == 200, f"an order failed: {reply.status_code} {reply.text[:200]}"):
        return []
    body = reply.json()
    payment, ledger = body.get("payment") or {}, body.get("ledger") or {}
    hops = [
        ("frontend", "orders", body.get("caller"), "TLS handshake, in MeshMiddleware"),
        ("orders", f"payments ({payment.get('instance')})", payment.get("caller"), "TLS handshake"),
        ("orders", "ledger (app behind the sidecar)", ledger.get("caller"), "x-forwarded-client-cert from the sidecar"),
    ]
    proofs = []
    for caller, callee, saw, how in hops:
        proofs.append([caller, callee, str(saw), how])
        expected = f"spiffe://cluster.local/ns/{NAMESPACE}/sa/{caller}"
        step.check(saw == expected, f"{callee} saw {saw}, not {expected}")
    step.check(ledger.get("meshlib_loaded") is False, "the ledger app's process has meshlib loaded")
    proofs.append(["-", "ledger app process", f"meshlib imported: {ledger.get('meshlib_loaded')}", "the app says"])
    return proofs


async def _plaintext(ctx: Context, step: StepResult, proofs: list[list[str]]) -> int:
    """Plaintext from outside the mesh, straight at an in-process port and at the sidecar's: both refused."""
    shop = ctx.shop
    targets = [("payments-v1-a", shop.instances["payments-v1-a"].port)]
    if shop.sidecar_ports is not None:
        targets.append(("ledger's sidecar", shop.sidecar_ports.inbound))
    refused = 0
    async with httpx.AsyncClient(timeout=5) as plain:
        for name, port in targets:
            try:
                r = await plain.get(f"http://127.0.0.1:{port}/health")
                outcome = f"{r.status_code}: {r.text.removeprefix('meshlib: ').split(' (')[0][:50]}"
                ok = r.status_code != 200
            except httpx.HTTPError as exc:
                outcome, ok = f"refused ({type(exc).__name__})", True
            refused += ok
            proofs.append(["plaintext client", name, outcome, "PeerAuthentication STRICT"])
            step.check(ok, f"a plaintext call to {name} was answered 200")
    return refused


# -- 4. authorization ---------------------------------------------------------------------

AUTHZ = """
frontend should go through orders, never write to the ledger itself, yet the mesh
lets it until a policy says otherwise. An AuthorizationPolicy (DENY, selecting
app=ledger, from principal cluster.local/ns/shop/sa/frontend) is applied live; the
control plane pushes it only to the ledger's data planes (one service never learns
another's rules), and the ledger's sidecar enforces it on the mTLS identity, before
the app sees the request. orders keeps writing to the ledger.
"""


async def authorization(ctx: Context, step: StepResult) -> None:
    api = ctx.shop.api()
    n = ctx.n(50)

    async def direct(i: int) -> httpx.Response:
        return await ctx.frontend.post("http://ledger/record", json={"sneaky": i})

    before = await send("frontend -> ledger, no policy", n, direct)
    change = await api.apply("AuthorizationPolicy ledger-deny-frontend", [deny_frontend_to_ledger()], ["ledger"])
    step.changes.append(change.describe())
    after = await send("frontend -> ledger, denied", n, direct)
    via_orders = await send("frontend -> orders -> ledger", n, ctx.order)
    denied = [r for r in after if r.status == 403]
    body = denied[0].text if denied else ""
    step.tables.append(
        Table(
            ["caller -> ledger", "before the policy", "after the policy", "answer"],
            [
                ["frontend (direct)", _counts(before), _counts(after), body[:40] or "-"],
                ["orders (in each order)", "-", _counts(via_orders), "200 from the ledger app"],
            ],
        )
    )
    step.figures = {
        "frontend_to_ledger_before": statuses(before),
        "frontend_to_ledger_after": statuses(after),
        "orders_to_ledger_after": statuses(via_orders),
        "denied": len(denied),
        "denied_body": body,
        "change": change.to_dict(),
    }
    step.check(all(r.ok for r in before), f"before the policy frontend -> ledger got {statuses(before)}")
    step.check(len(denied) == len(after), f"after the policy frontend -> ledger got {statuses(after)}, not all 403")
    step.check("RBAC: access denied" in body, f"the 403 did not say 'RBAC: access denied': {body[:80]!r}")
    step.check(all(r.ok for r in via_orders), f"orders -> ledger got {statuses(via_orders)} after the policy")
    step.summary = (
        f"frontend -> ledger: {len(denied)}/{len(after)} denied (403 RBAC); orders -> ledger: {_counts(via_orders)}"
    )


def _counts(replies: list[Reply]) -> str:
    return ", ".join(f"{n}x {s}" for s, n in statuses(replies).items())


# -- 5. rate limit ------------------------------------------------------------------------

RATE = "20/second"
RATE_LIMIT = f"""
orders gets a RateLimitPolicy (meshlib.io/v1alpha1, SERVER side): {RATE} per calling
principal. frontend then sends a burst as fast as 16 connections allow. orders'
MeshMiddleware answers what is over the limit with 429 and a Retry-After header, after
authorization and before the app, so a refused order costs orders nothing. The policy
is deleted afterwards (DELETE /v1/resources/...).
"""


async def rate_limit(ctx: Context, step: StepResult) -> None:
    api = ctx.shop.api()
    change = await api.apply(f"RateLimitPolicy orders-per-caller {RATE}", [orders_rate_limit(RATE)], ["orders"])
    step.changes.append(change.describe())
    try:
        started = time.monotonic()
        replies = await send(f"burst at orders ({RATE} per caller)", ctx.n(150), ctx.order, concurrency=16)
        elapsed = time.monotonic() - started
    finally:  # the next steps need orders unlimited, whatever happened here
        removed = await api.delete("delete it", f"RateLimitPolicy/{NAMESPACE}/orders-per-caller", ["orders"])
    step.changes.append(removed.describe())
    limited = [r for r in replies if r.status == 429]
    allowed = [r for r in replies if r.ok]
    step.tables.append(
        Table(
            ["sent", "in", "200 (allowed)", "429 (limited)", "other", "Retry-After of a 429", "limit"],
            [
                [
                    str(len(replies)),
                    f"{elapsed:.2f} s",
                    str(len(allowed)),
                    str(len(limited)),
                    str(len(replies) - len(limited) - len(allowed)),
                    f"{limited[0].retry_after} s" if limited and limited[0].retry_after else "-",
                    RATE,
                ]
            ],
        )
    )
    step.figures = {
        "rate": RATE,
        "requests": len(replies),
        "seconds": round(elapsed, 3),
        "allowed": len(allowed),
        "limited": len(limited),
        "retry_after": limited[0].retry_after if limited else None,
        "statuses": statuses(replies),
        "changes": [change.to_dict(), removed.to_dict()],
    }
    step.check(len(limited) > 0, f"no 429 in a burst of {len(replies)} ({statuses(replies)})")
    step.check(len(allowed) > 0, "every request was limited")
    step.check(all(r.retry_after for r in limited), "a 429 came without a Retry-After header")
    step.check(len(allowed) + len(limited) == len(replies), f"other answers than 200/429: {statuses(replies)}")
    # Sliding window: at most the rate per second, plus one window's worth carried over.
    step.check(len(allowed) <= 20 * (elapsed + 2), f"{len(allowed)} allowed in {elapsed:.2f} s is over {RATE}")
    step.summary = f"{len(limited)} of {len(replies)} answered 429, {len(allowed)} allowed in {elapsed:.2f} s ({RATE})"
