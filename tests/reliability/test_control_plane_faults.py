"""Control-plane faults not covered in tests/control/test_agent.py: black-holed mid-traffic, and slow to answer.

A black-holed control plane accepts connections (the kernel's backlog) and never
answers: the agent must notice through its keepalive, keep serving the last
snapshot, and converge when the real control plane is back on the same port.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _upstreams import Upstream, to, upstreams, virtual_service

from tests.control.test_agent import HOST, Traffic, apply, connect, control_plane, routed
from tests.reliability._chaos import record


@pytest.fixture
def pair() -> Iterator[tuple[Upstream, Upstream]]:
    with upstreams(Upstream("a", version="v1"), Upstream("b", version="v2")) as (v1, v2):
        yield v1, v2


def test_a_black_holed_control_plane_mid_traffic_fails_no_request_and_the_agent_reconverges(
    tmp_path: Path, pair: tuple[Upstream, Upstream]
) -> None:
    v1, v2 = pair
    with control_plane(tmp_path, routed(v1, v2, "v1")) as cp:
        mesh = connect(cp, tmp_path)
        agent = mesh.agent
        assert agent is not None
        try:
            with Traffic(mesh) as traffic:
                traffic.wait_answers(10)
                cp.stop_serving()
                with socket.socket() as hole:
                    hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    hole.bind(("127.0.0.1", cp.port))
                    hole.listen(64)  # accepts (backlog), never answers
                    cp.wait_for(lambda: agent.stale and not agent.connected, timeout=10, what="the agent to notice")
                    start = time.monotonic()
                    traffic.wait_answers(50)
                    during = len([t for t, _ in traffic.answers if t >= start])
                cp.start_serving()
                cp.wait_for(lambda: agent.connected and not agent.stale, timeout=20, what="the reconnection")
                assert agent.wait_for_version(
                    apply(cp, [virtual_service(HOST, {"route": [to(HOST, "v2")]})]), timeout=5
                )
                after = time.monotonic()
                traffic.wait_answers(10)
            assert traffic.failures == []
            assert traffic.first_after(after, "v2") is not None
            record(
                "control plane black-holed",
                requests=len(traffic.answers),
                errors=len(traffic.failures),
                served_while_black_holed=during,
            )
        finally:
            mesh.close()
