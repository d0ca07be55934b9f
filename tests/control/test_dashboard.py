"""The control plane's dashboard: its rates from data-plane reports, its tokens, and the page in real Chromium.

The browser test runs Debian's chromium (``/usr/bin/chromium``, installed by
``dev.py``/``.ci/run``) through Playwright, against a real control plane, a data plane
connected to it with traffic flowing, and a bad change that data plane refuses. It
saves ``artifacts/dashboard.png`` (the CI artifact; docs/img/dashboard.png is a copy).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _upstreams import Upstream, destination_rule, service_entry, to, upstreams, virtual_service

import meshlib
from meshlib.control._report import Reports, quantile
from meshlib.policy import Workload
from meshlib.telemetry._metrics import DURATION_BUCKETS_MS
from tests.control._cp import RunningControlPlane, running_control_plane

HOST = "reviews"
VIEW_TOKEN = "mlt_view-token-for-tests"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def routed(v1: Upstream, v2: Upstream) -> list[dict[str, Any]]:
    return [
        service_entry(HOST, v1, v2),
        destination_rule(HOST, ("v1", "v2")),
        virtual_service(HOST, {"route": [to(HOST, "v1", 80), to(HOST, "v2", 20)]}),
    ]


def mesh_config(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "meshlib.io/v1alpha1",
        "kind": "MeshConfig",
        "metadata": {"name": "mesh", "namespace": "istio-system"},
        "spec": spec,
    }


def connect(cp: RunningControlPlane, tmp_path: Path, name: str) -> meshlib.Mesh:
    who = Workload(name, namespace="default", labels={"version": "v1"})
    token = cp.token(who.namespace, who.service_account)
    coro = meshlib.Mesh.connect(cp.url, workload=who, token=token, cache_dir=tmp_path / f"cache-{name}", keepalive=0.5)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # Playwright's sync API runs a loop in this thread
        mesh = pool.submit(asyncio.run, coro).result()
    assert mesh.agent is not None
    mesh.agent.report_interval = 0.3
    return mesh


class Traffic:
    """A client calling ``http://reviews/`` in a loop from a thread."""

    def __init__(self, mesh: meshlib.Mesh) -> None:
        self.mesh = mesh
        self.answers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.mesh.client(timeout=5) as client:
            while not self._stop.is_set():
                try:
                    client.get(f"http://{HOST}/")
                    self.answers += 1
                except httpx.HTTPError:
                    pass
                time.sleep(0.01)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def mesh_with_traffic(tmp_path: Path) -> Iterator[tuple[RunningControlPlane, meshlib.Mesh, Traffic]]:
    with (
        upstreams(Upstream("a", version="v1"), Upstream("b", version="v2")) as (v1, v2),
        running_control_plane(tmp_path, routed(v1, v2), keepalive=0.5, view_token=VIEW_TOKEN) as cp,
    ):
        order = connect(cp, tmp_path, "order")
        try:
            with Traffic(order) as traffic:
                yield cp, order, traffic
        finally:
            order.close()


# -- the numbers ----------------------------------------------------------------------


def _edge(requests: float, errors: float, bucket_ms: float, reporter: str = "source") -> dict[str, Any]:
    """Cumulative counters for ``requests`` requests all lasting ``bucket_ms``."""
    buckets = [requests if bound >= bucket_ms else 0.0 for bound in DURATION_BUCKETS_MS] + [requests]
    return {
        "reporter": reporter,
        "source": "order",
        "source_namespace": "default",
        "destination": HOST,
        "requests": requests,
        "errors": errors,
        "buckets": buckets,
    }


def test_rates_are_made_from_the_difference_of_two_cumulative_reports() -> None:
    reports = Reports(window=10)
    reports.add("n1", {"edges": [_edge(100, 0, 5)]}, now=0.0)
    assert reports.edges(now=0.0)[0]["rps"] is None  # one report: totals, no rate yet
    reports.add("n1", {"edges": [_edge(300, 20, 5)]}, now=4.0)
    [edge] = reports.edges(now=4.0)
    assert edge["rps"] == pytest.approx(50.0)
    assert edge["success_rate"] == pytest.approx(0.9)
    assert 1 < edge["p50_ms"] <= 5
    assert edge["requests"] == 300


def test_an_edge_both_ends_report_is_counted_once_from_its_source() -> None:
    reports = Reports()
    reports.add("client", {"edges": [_edge(10, 0, 5)]}, now=0.0)
    reports.add("client", {"edges": [_edge(30, 0, 5)]}, now=2.0)
    reports.add("server", {"edges": [_edge(10, 0, 5, "destination")]}, now=0.0)
    reports.add("server", {"edges": [_edge(30, 0, 5, "destination")]}, now=2.0)
    [edge] = reports.edges(now=2.0)
    assert edge["reporter"] == "source"
    assert edge["rps"] == pytest.approx(10.0)


def test_quantiles_interpolate_inside_istios_buckets() -> None:
    cumulative = [0.0, 0.0, 50.0, 100.0] + [100.0] * (len(DURATION_BUCKETS_MS) - 4) + [100.0]
    assert quantile(0.5, cumulative) == pytest.approx(5.0)
    assert quantile(0.99, cumulative) == pytest.approx(9.9)
    assert quantile(0.5, [0.0] * (len(DURATION_BUCKETS_MS) + 1)) is None


# -- the tokens -----------------------------------------------------------------------


def test_the_page_is_public_its_state_needs_the_view_token_which_changes_nothing(
    mesh_with_traffic: tuple[RunningControlPlane, meshlib.Mesh, Traffic],
) -> None:
    cp, order, _ = mesh_with_traffic
    with httpx.Client(base_url=cp.url, timeout=5) as c:
        page = c.get("/dashboard")
        assert page.status_code == 200
        assert "content-security-policy" in page.headers
        assert VIEW_TOKEN not in page.text
        assert cp.admin_token not in page.text
        assert c.get("/dashboard/static/app.js").status_code == 200
        assert c.get("/dashboard/static/../_server.py").status_code == 404
        assert c.get("/dashboard/state").status_code == 401
        view = {"authorization": f"Bearer {VIEW_TOKEN}"}
        state = c.get("/dashboard/state", headers=view)
        assert state.status_code == 200
        assert c.get("/dashboard/state", headers={"authorization": f"Bearer {cp.admin_token}"}).status_code == 200
        # The view token is for the dashboard only: no admin API, no data-plane API.
        assert c.post("/v1/rollback", json={"version": 1}, headers=view).status_code == 401
        assert c.get("/v1/resources", headers=view).status_code == 401
        assert c.post("/v1/report", json={"node": "x"}, headers=view).status_code == 401
    # The data plane reports: its certificate and its traffic arrive.
    assert order.agent is not None
    node = order.agent.node

    def reported() -> dict[str, Any] | None:
        state = cp.get("/dashboard/state")
        planes = [d for d in state["dataplanes"] if d["node"] == node and d["certificate"]]
        edges = [e for e in state["edges"] if e["source"] == "order" and e["service"] == HOST and e["rps"]]
        return state if planes and edges else None

    state = cp.wait_for(reported, timeout=10, what="a report with traffic")
    [plane] = [d for d in state["dataplanes"] if d["node"] == node]
    assert plane["certificate"]["identity"] == "spiffe://cluster.local/ns/default/sa/order"
    assert plane["certificate"]["not_after"] > time.time()


# -- the page, in Chromium ------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM) or shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: dev.py installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield browser
        finally:
            browser.close()


def test_the_dashboard_shows_live_traffic_and_a_nack_in_chromium(
    browser: Any, mesh_with_traffic: tuple[RunningControlPlane, meshlib.Mesh, Traffic], tmp_path: Path
) -> None:
    cp, order, traffic = mesh_with_traffic
    assert order.agent is not None
    good = order.agent.version
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []  # JavaScript exceptions (a refused request is logged to the console, and expected)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(15_000)
    try:
        page.goto(f"{cp.url}/dashboard#token={VIEW_TOKEN}")
        assert "#token" not in page.url  # the token leaves the address bar at once
        # The services, and a non-zero request rate on the edge between them.
        page.wait_for_selector('#graph [data-service="order"]')
        page.wait_for_selector(f'#graph [data-service="{HOST}"]')
        page.wait_for_function(
            f"""() => {{
                const row = document.querySelector('#edges tr[data-source="order"][data-service="{HOST}"]');
                return row !== null && parseFloat(row.dataset.rps) > 0;
            }}"""
        )
        row = page.locator(f'#edges tr[data-service="{HOST}"]')
        assert float(row.get_attribute("data-rps") or 0) > 0
        assert "100%" in row.inner_text()
        plane = page.locator(f'#dataplanes tr[data-node="{order.agent.node}"]')
        assert plane.get_attribute("data-state") == "ACKED"
        assert "spiffe://cluster.local/ns/default/sa/order" in plane.inner_text()
        assert "ServiceEntry" in page.locator("#resources").inner_text()

        # A change the control plane accepts and this data plane refuses: a NACK, with its error.
        bad_path = tmp_path / "no-such-folder" / "access.log"
        r = cp.apply([mesh_config(accessLog={"path": str(bad_path)}), *routed_again(cp)])
        assert r.status_code == 200, r.text
        refused = int(r.json()["version"])
        page.wait_for_selector(f'#dataplanes tr[data-node="{order.agent.node}"][data-state="NACKED"]')
        assert str(bad_path) in plane.locator(".last-error").inner_text()
        assert f"version {refused}" in page.locator("#summary").inner_text()
        assert "NACKED" in page.locator("#summary").inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000

        # Rolling back needs the admin token: the view token is refused, the admin token works.
        page.fill("#rollback-version", str(good))
        page.fill("#admin-token", VIEW_TOKEN)
        page.click("#rollback")
        page.wait_for_selector("#admin-result.error")
        assert "refused" in page.locator("#admin-result").inner_text()
        page.fill("#admin-token", cp.admin_token)
        page.click("#rollback")
        page.wait_for_function("() => document.querySelector('#admin-result').textContent.startsWith('done')")
        page.wait_for_selector(f'#dataplanes tr[data-node="{order.agent.node}"][data-state="ACKED"]')
        assert f"rollback to {good}" in page.locator("#history").inner_text()
        assert traffic.answers > 0
        assert errors == []
    finally:
        page.close()


def routed_again(cp: RunningControlPlane) -> list[dict[str, Any]]:
    """The routing documents in force (the bad change only adds the MeshConfig)."""
    return [d for d in cp.get("/v1/resources")["resources"] if d["kind"] != "MeshConfig"]
