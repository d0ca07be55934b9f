"""``meshlib demo --keep-running`` prints the dashboard's URL, and in Chromium the page shows the demo's traffic."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
URL = re.compile(r"dashboard\s+(http://127\.0\.0\.1:\d+/dashboard#token=\S+)")


@pytest.fixture
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: dev.py installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
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
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def demo() -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshlib", "demo", "--keep-running", "--scale", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    found: list[str] = []
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            match = URL.search(line)
            if match and not found:
                found.append(match.group(1))
                seen.set()
        seen.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert seen.wait(120), "the demo printed no dashboard URL"
        assert found, "".join(lines[-40:])
        yield proc, found[0]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_the_demo_dashboard_shows_the_shop_and_its_traffic(
    browser: Any, demo: tuple[subprocess.Popen[str], str]
) -> None:
    proc, url = demo
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(20_000)
    try:
        page.goto(url)
        for service in ("frontend", "orders", "payments"):
            page.wait_for_selector(f'#graph [data-service="{service}"]')
        page.wait_for_function(
            """() => [...document.querySelectorAll('#edges tr[data-rps]')]
                      .some(row => row.dataset.source === 'frontend' && parseFloat(row.dataset.rps) > 0)"""
        )
        planes = page.locator("#dataplanes tr[data-state]")
        assert planes.count() >= 6, "every workload of the shop streams from the control plane"
        assert "ledger" in page.locator("#dataplanes").inner_text(), "the sidecar's data plane too"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-demo.png"), full_page=True)
        assert errors == []
        assert proc.poll() is None, "the demo is still up (--keep-running)"
    finally:
        page.close()
    time.sleep(0)  # the fixture stops the demo with Ctrl-C
