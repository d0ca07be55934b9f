"""``meshlib demo``: a live service mesh on this machine, changed while traffic flows, with measured results.

It exists to convince in five minutes, so every figure it prints is measured from real
requests over real sockets, and every claim is checked: a step whose numbers do not
hold is reported FAILED, with the reason, and the command exits 1. Nothing is needed
but the install: everything listens on free loopback ports, state lives in a temporary
directory, and every thread and process it starts is stopped on the way out (Ctrl-C
included).

- ``_shop``: the control plane and the shop's workloads, and how they start and stop;
- ``_steps``: the seven steps, each an explanation, a live change, a measurement, checks;
- ``_report``: tables, the final report, the ``--json`` figures;
- ``_static``: the old static view of a configuration (``--static``, ``--config PATH``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ._context import Context
from ._processes import Children
from ._report import Report, Table
from ._shop import Shop
from ._static import SHOP_CONFIG, run_static
from ._steps import STEPS, run_step

__all__ = ["SHOP_CONFIG", "DemoOptions", "run_demo", "run_static"]

_START_TIMEOUT = 90.0
_STOP_TIMEOUT = 30.0
_INTRO = """
A small shop starts on this machine, all of it on loopback. A control plane (embedded
store and CA in a temporary directory) holds the policy. frontend (an in-process
client) sends orders to orders (an in-process server with MeshMiddleware), which pays
with payments (v1 twice, v2 once: in-process servers) and records the order in the
ledger: a plain ASGI app with no meshlib import, in its own process behind `meshlib
sidecar`. Each workload got a bootstrap token from the control plane, connected with
Mesh.connect (the sidecar with --control-plane), got its certificate from the control
plane's CA and registered its port in the registry; calls find each other by name.
"""


@dataclass
class DemoOptions:
    """``meshlib demo``'s options (see ``meshlib demo --help``)."""

    keep_running: bool = False
    json_path: Path | None = None
    scale: float = 1.0
    static: bool = False
    config: str | None = None


def run_demo(options: DemoOptions | None = None) -> int:
    """The exit status: 0 when every step passed, 1 when one failed, 130 when interrupted."""
    options = options or DemoOptions()
    if options.static or options.config is not None:
        return run_static(options.config)
    try:
        return asyncio.run(_live(options))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\nmeshlib demo: interrupted; every thread and process it started is stopped", file=sys.stderr)
        return 130


async def _live(options: DemoOptions) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="meshlib-demo-"))
    report = Report(sys.stdout)
    report.workdir = str(workdir)
    children = Children(workdir)
    shop = Shop(workdir, children)
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if main is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # SIGTERM: clean up as on Ctrl-C
            loop.add_signal_handler(signal.SIGTERM, main.cancel)
    finished = False
    try:
        with _logging_to(workdir / "demo.log"):
            try:
                report.heading("meshlib demo: a live shop, changed through its control plane while traffic flows")
                report.paragraph(_INTRO)
                try:
                    await asyncio.wait_for(shop.start(), _START_TIMEOUT)
                except Exception as exc:
                    report.setup_error = f"{type(exc).__name__}: {exc}"
                else:
                    _describe(shop, report)
                    await _walk_through(shop, report, options)
                report.links = _links(shop)
                report.processes = [{"name": c.name, "pid": c.pid} for c in children.children]
                report.final()
                if options.json_path is not None:
                    report.write_json(options.json_path)
                finished = True
                if options.keep_running and report.setup_error is None:
                    await _keep_running(shop, report)
            finally:
                try:
                    await asyncio.wait_for(shop.stop(), _STOP_TIMEOUT)
                except Exception as exc:  # still stop the processes, and say what did not stop cleanly
                    print(f"meshlib demo: stopping the shop: {type(exc).__name__}: {exc}", file=sys.stderr)
                finally:
                    children.stop_all()
    finally:
        if finished and not report.ok:
            print(f"meshlib demo: logs kept in {workdir}", file=sys.stderr)
        else:  # passed, or interrupted: nothing worth keeping
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report.ok else 1


async def _walk_through(shop: Shop, report: Report, options: DemoOptions) -> None:
    async with (
        shop.mesh("frontend").async_client(timeout=10.0) as frontend,
        shop.mesh("orders").async_client(timeout=10.0) as orders,
    ):
        ctx = Context(shop, frontend, orders, scale=options.scale)
        for number, step in enumerate(STEPS, 1):
            report.begin(number, step.title, step.explanation)  # the explanation first, the tables after
            report.end(await run_step(ctx, number, step))


def _describe(shop: Shop, report: Report) -> None:
    rows = [["control plane", "this process (a thread)", shop.cp.url, f"state in {shop.cp.state_dir}"]]
    for instance in shop.instances.values():
        where = f"127.0.0.1:{instance.port}" if instance.port else "- (a client)"
        how = f"Mesh.connect, as {instance.workload} version={instance.version}"
        rows.append([instance.name, "this process (the shop's loop)", where, how])
    if shop.ledger_app is not None:
        rows.append(["ledger app", f"pid {shop.ledger_app.pid}", f"127.0.0.1:{shop.ledger_port}", "no meshlib import"])
    if shop.sidecar is not None and shop.sidecar_ports is not None:
        p = shop.sidecar_ports
        rows.append(
            [
                "ledger sidecar",
                f"pid {shop.sidecar.pid}",
                f"127.0.0.1:{p.inbound} (in), :{p.outbound} (out), :{p.admin} (admin)",
                "meshlib sidecar --control-plane",
            ]
        )
    report.say(Table(["what", "runs in", "listens on", "joined with"], rows).render())
    report.say()
    report.say(f"  started in {shop.started_in:.1f} s")
    report.setup = {"seconds": round(shop.started_in, 2), "control_plane": shop.cp.url, "what": rows}


def _links(shop: Shop) -> dict[str, str]:
    links: dict[str, str] = {}
    if shop.cp.url:
        links["control plane /metrics"] = f"{shop.cp.url}/metrics"
    if shop.metrics_url:
        for name in shop.instances:
            links[f"{name} /metrics"] = f"{shop.metrics_url}/metrics/{name}"
    if shop.sidecar_ports is not None:
        admin = f"http://127.0.0.1:{shop.sidecar_ports.admin}"
        links["ledger sidecar /metrics"] = f"{admin}/metrics"
        links["ledger sidecar /config"] = f"{admin}/config"
    if shop.cp.url:
        links["dashboard"] = shop.cp.dashboard_url
    return links


async def _keep_running(shop: Shop, report: Report) -> None:
    """Keep the mesh up, with a trickle of orders so the metrics move, until Ctrl-C."""
    report.heading("The mesh stays up (--keep-running); Ctrl-C stops everything")
    token = shop.cp.admin_token_file
    report.say(f"  control plane    {shop.cp.url}   (admin token in {token})")
    report.say(f"  dashboard        {shop.cp.dashboard_url}")
    report.say(f"  try              meshlib apply --control-plane {shop.cp.url} --admin-token-file {token} FILE.yaml")
    report.say(f'                   curl -H "Authorization: Bearer $(cat {token})" {shop.cp.url}/v1/dataplanes')
    report.say("  frontend sends an order every half second meanwhile.")
    with contextlib.suppress(asyncio.CancelledError):
        async with shop.mesh("frontend").async_client(timeout=10.0) as frontend:
            while True:
                with contextlib.suppress(Exception):
                    await frontend.post("http://orders/orders", json={"item": "keep-running"})
                await asyncio.sleep(0.5)
    report.say("  stopping the shop, the sidecar and the control plane...")


@contextlib.contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    """Everything logged (meshlib, uvicorn) goes to a file while the demo runs: the terminal is the report's.

    httpx's per-request INFO lines are left out: thousands of them would cost the
    traffic's own CPU and bury what matters.
    """
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root, chatty = logging.getLogger(), logging.getLogger("httpx")
    levels = root.level, chatty.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    chatty.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        chatty.setLevel(levels[1])
        handler.close()
