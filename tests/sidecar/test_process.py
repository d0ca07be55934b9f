"""``meshlib sidecar`` as a process: the CLI as an operator runs it, SIGTERM, and the proxy's own memory.

Each test starts ``python -m meshlib sidecar --workload front --config FILE --app ...`` with
every listener on a free loopback port (the ready line says which), in front of a
recording app in this process.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests._upstreams import service_entry, serving
from tests.sidecar._sidecar import RecordingApp, SidecarProcess, connect, read_response, sidecar_process, wait_for

MB = 1024 * 1024


@dataclass
class Setup:
    sidecar: SidecarProcess
    app: RecordingApp


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    app = RecordingApp("app")
    with serving(app) as port:
        address = f"127.0.0.1:{port}"
        config = tmp_path / "mesh.yaml"
        config.write_text(yaml.safe_dump(service_entry("app", (address, "v1"))))
        args = ("--workload", "front", "--config", str(config), "--app", address, "--drain-timeout", "5")
        with sidecar_process(*args) as sidecar:
            yield Setup(sidecar, app)


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def test_sigterm_drains_requests_in_flight_then_exits_0(setup: Setup) -> None:
    sidecar, app = setup.sidecar, setup.app
    results: list[tuple[int, float]] = []

    def call(url: str, proxy: str | None) -> None:
        with httpx.Client(proxy=proxy, timeout=10) as client:
            response = client.get(url)
        results.append((response.status_code, time.monotonic()))

    calls = [
        threading.Thread(target=call, args=("http://app/sleep?s=1", sidecar.proxy)),
        threading.Thread(target=call, args=("http://app/sleep?s=1", sidecar.proxy)),
        threading.Thread(target=call, args=(f"{sidecar.inbound_url}/sleep?s=1", None)),
    ]
    for thread in calls:
        thread.start()
    wait_for(lambda: app.in_flight == 3, what="three requests in the app")
    sidecar.terminate()
    term = time.monotonic()
    wait_for(lambda: refused(sidecar.ports["outbound"]) and refused(sidecar.ports["inbound"]), 0.8, "refusals")
    refusing = time.monotonic()
    draining = sidecar.admin("/ready")  # the admin port stays up while the listeners drain
    assert app.in_flight == 3  # the listeners closed while the requests were still in the app
    for thread in calls:
        thread.join(10)
    code = sidecar.wait(10)
    exited = time.monotonic()
    assert code == 0, sidecar.output
    assert [status for status, _ in results] == [200, 200, 200]
    assert refusing - term < 0.8
    assert draining.status_code == 503
    assert draining.json() == {"status": "not ready"}
    assert exited >= max(done for _, done in results)  # it left after answering them
    assert exited - term < 3.0
    assert "draining" in sidecar.output


def test_sigterm_with_nothing_in_flight_exits_at_once(setup: Setup) -> None:
    with setup.sidecar.client() as client:
        assert client.get("http://app/").status_code == 200  # leaves a kept-alive connection open
        started = time.monotonic()
        setup.sidecar.terminate()
        assert setup.sidecar.wait(10) == 0
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("listener", ["outbound", "inbound"])
def test_a_20_mb_response_streams_through_without_the_sidecar_holding_it(setup: Setup, listener: str) -> None:
    sidecar = setup.sidecar
    port = sidecar.ports[listener]
    total = 20 * MB

    def fetch(n: int, pause: float = 0.0) -> int:
        """Read the whole answer, stopping ``pause`` s after the first MB (a slow reader: nothing may pile up)."""
        with connect(port, timeout=10) as sock:
            sock.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: app\r\n\r\n" % n)
            head = read_response(sock, head_only=True)
            assert head is not None
            assert head.status == 200
            assert head.header("content-length") == str(n)
            got = len(head.body)
            paused = False
            while got < n:
                if not paused and got >= MB:
                    paused = True
                    time.sleep(pause)
                    peaks.append(sidecar.memory_kb("VmRSS"))
                data = sock.recv(256 * 1024)
                if not data:
                    break
                got += len(data)
            return got

    peaks: list[int] = []
    assert fetch(2 * MB) == 2 * MB  # warm up: pools, buffers, imports
    before = sidecar.memory_kb("VmHWM")
    assert fetch(total, pause=0.5) == total
    after = sidecar.memory_kb("VmHWM")
    assert (after - before) * 1024 < 8 * MB, (before, after, peaks)
