"""The caller's deadline (``x-meshlib-deadline``, remaining milliseconds) bounds the work a server does.

``MeshMiddleware`` turns the header into a local deadline, sets
``meshlib.engine.current_deadline`` for the app (so the mesh client sends what is
left on every call the app makes) and answers 504 when the deadline passes before
the response starts, cancelling the app. The chain test runs three services on real
uvicorn servers, each with its own ``Mesh``: the whole chain gives up at the first
caller's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from _upstreams import free_port, service_entry, serving, virtual_service

import meshlib
from meshlib.engine import current_deadline
from meshlib.server import MeshMiddleware

HEADER = "x-meshlib-deadline"


def mesh_of(*docs: dict[str, Any], workload: str = "httpbin") -> meshlib.Mesh:
    return meshlib.Mesh.from_resources(list(docs), workload=meshlib.Workload(workload))


class SlowApp:
    """Sleeps ``delay`` seconds, then answers 200; records what it saw and how it ended."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.started: list[float | None] = []  # current_deadline as the app saw it
        self.extensions: list[Any] = []
        self.outcomes: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.started.append(current_deadline.get())
        self.extensions.append(scope.get("extensions", {}).get("meshlib.deadline"))
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.outcomes.append("cancelled")
            raise
        self.outcomes.append("completed")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


async def get(app: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://httpbin") as http:
        return await http.get("/", headers=headers)


async def test_a_deadline_already_past_is_504_and_the_app_never_runs() -> None:
    app = SlowApp()
    response = await get(MeshMiddleware(app, mesh=mesh_of()), {HEADER: "0"})
    assert response.status_code == 504
    assert "deadline" in response.text
    assert app.started == []


async def test_the_app_is_cancelled_at_the_deadline_and_the_caller_gets_504() -> None:
    app = SlowApp(delay=2.0)
    began = time.monotonic()
    response = await get(MeshMiddleware(app, mesh=mesh_of()), {HEADER: "200"})
    elapsed = time.monotonic() - began
    assert response.status_code == 504
    assert elapsed < 1.5
    assert app.outcomes == ["cancelled"]


async def test_the_app_sees_the_deadline() -> None:
    app = SlowApp()
    before = time.monotonic()
    response = await get(MeshMiddleware(app, mesh=mesh_of()), {HEADER: "5000"})
    assert response.status_code == 200
    seen = app.started[0]
    assert seen is not None
    assert before + 4.5 < seen <= time.monotonic() + 5.0
    assert app.extensions == [seen]
    assert current_deadline.get() is None  # reset once the request is done


async def test_without_a_header_there_is_no_deadline_and_a_bad_header_is_ignored() -> None:
    app = SlowApp()
    mw = MeshMiddleware(app, mesh=mesh_of())
    assert (await get(mw)).status_code == 200
    assert (await get(mw, {HEADER: "soon"})).status_code == 200
    assert (await get(mw, {HEADER: "-5"})).status_code == 200
    assert app.started == [None, None, None]


async def test_propagation_off_in_mesh_config_ignores_the_header() -> None:
    config = {
        "apiVersion": "meshlib.io/v1alpha1",
        "kind": "MeshConfig",
        "metadata": {"name": "mesh", "namespace": "istio-system"},
        "spec": {"deadlinePropagation": {"enabled": False}},
    }
    app = SlowApp()
    assert (await get(MeshMiddleware(app, mesh=mesh_of(config)), {HEADER: "0"})).status_code == 200
    assert app.started == [None]


async def test_an_app_timeout_of_its_own_is_no_504() -> None:
    # The app's own TimeoutError (asyncio.wait_for inside it, say) is the app's error, not the caller's deadline.
    async def impatient(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await asyncio.wait_for(asyncio.sleep(1), 0.01)

    with pytest.raises(TimeoutError):
        await get(MeshMiddleware(impatient, mesh=mesh_of()), {HEADER: "5000"})


async def test_the_apps_own_calls_running_out_of_the_deadline_is_504_not_500() -> None:
    # The app's mesh client inherits the deadline and may give up a hair before the middleware's timer.
    async def calls_out(scope: dict[str, Any], receive: Any, send: Any) -> None:
        deadline = current_deadline.get()
        assert deadline is not None
        await asyncio.sleep(max(0.0, deadline - time.monotonic() - 0.02))
        error = meshlib.DeadlineExceededError("outbound|80||b: deadline after 1 attempt(s)")
        error.from_caller = True  # what the mesh client sets when the caller's deadline is the one that ran out
        raise error

    response = await get(MeshMiddleware(calls_out, mesh=mesh_of()), {HEADER: "150"})
    assert response.status_code == 504

    # The app's own shorter timeout (from_caller False): the app's error, not a 504.
    async def own_timeout(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise meshlib.DeadlineExceededError("outbound|80||b: deadline after 1 attempt(s)")

    with pytest.raises(meshlib.DeadlineExceededError):
        await get(MeshMiddleware(own_timeout, mesh=mesh_of()), {HEADER: "5000"})


def test_a_response_already_started_is_cut_not_replaced() -> None:
    async def streaming(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        await asyncio.sleep(2)

    port = free_port()
    with serving(MeshMiddleware(streaming, mesh=mesh_of()), port=port):
        began = time.monotonic()
        with httpx.stream("GET", f"http://127.0.0.1:{port}/", headers={HEADER: "200"}) as response:
            assert response.status_code == 200  # already sent: no 504 can follow it
            with pytest.raises(httpx.RemoteProtocolError):
                response.read()  # the caller sees a cut response, never a complete-looking one
        assert time.monotonic() - began < 1.5


# -- a chain of three services on real uvicorn servers -------------------------------------------


class Hop:
    """A service that calls ``next_host`` through its mesh and answers with what it got."""

    def __init__(self, mesh: meshlib.Mesh, next_host: str) -> None:
        self.mesh = mesh
        self.next_host = next_host
        self.sent: list[str | None] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async with self.mesh.async_client() as http:
            response = await http.get(f"http://{self.next_host}/")
        self.sent.append(response.request.headers.get(HEADER))
        body = response.content
        head = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": response.status_code, "headers": head})
        await send({"type": "http.response.body", "body": body})


class Sleeper:
    """The end of the chain: sleeps 3 s, recording whether the sleep completed or was cancelled."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.deadlines: list[str | None] = []
        self.ended = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.deadlines.append(dict(scope["headers"]).get(HEADER.encode(), b"").decode() or None)
        try:
            await asyncio.sleep(3)
        except asyncio.CancelledError:
            self.outcomes.append("cancelled")
            self.ended.set()
            raise
        self.outcomes.append("completed")
        self.ended.set()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def chain() -> Iterator[tuple[int, Hop, Hop, Sleeper]]:
    """A → B → C, each a uvicorn server behind its own MeshMiddleware and Mesh; yields A's port."""
    port_a, port_b, port_c = free_port(), free_port(), free_port()
    mesh_a = mesh_of(service_entry("b", (f"127.0.0.1:{port_b}", "v1")), workload="a")
    mesh_b = mesh_of(service_entry("c", (f"127.0.0.1:{port_c}", "v1")), workload="b")
    mesh_c = mesh_of(workload="c")
    a, b, c = Hop(mesh_a, "b"), Hop(mesh_b, "c"), Sleeper()
    with (
        serving(MeshMiddleware(c, mesh=mesh_c), port=port_c),
        serving(MeshMiddleware(b, mesh=mesh_b), port=port_b),
        serving(MeshMiddleware(a, mesh=mesh_a), port=port_a),
    ):
        yield port_a, a, b, c


async def test_a_chain_gives_up_at_the_first_callers_deadline() -> None:
    with chain() as (port_a, _a, _b, c):
        began = time.monotonic()
        async with httpx.AsyncClient() as http:
            response = await http.get(f"http://127.0.0.1:{port_a}/", headers={HEADER: "300"})
        elapsed = time.monotonic() - began
        assert c.ended.wait(2), "C's handler is still running"
    assert response.status_code == 504
    assert elapsed < 1.5
    assert c.outcomes == ["cancelled"]  # C stopped working when the first caller's deadline passed
    assert c.deadlines[0] is not None
    assert 0 < int(c.deadlines[0]) <= 300


async def test_a_chain_under_a_mesh_route_timeout() -> None:
    with chain() as (port_a, _a, _b, c):
        caller = mesh_of(
            service_entry("a", (f"127.0.0.1:{port_a}", "v1")),
            virtual_service("a", {"route": [{"destination": {"host": "a"}}], "timeout": "300ms"}),
            workload="caller",
        )
        began = time.monotonic()
        async with caller.async_client() as http:
            try:
                outcome: int | str = (await http.get("http://a/")).status_code
            except meshlib.DeadlineExceededError:
                outcome = "deadline exceeded"
        elapsed = time.monotonic() - began
        assert c.ended.wait(2), "C's handler is still running"
    assert outcome in (504, "deadline exceeded")
    assert elapsed < 1.5
    assert c.outcomes == ["cancelled"]


async def test_the_mesh_client_marks_a_deadline_that_was_the_callers() -> None:
    mesh = meshlib.Mesh.from_resources([service_entry("b", ("127.0.0.1:9", "v1"))], workload="a")
    token = current_deadline.set(time.monotonic() - 0.001)  # the caller's deadline has passed
    try:
        async with mesh.async_client() as client:
            with pytest.raises(meshlib.DeadlineExceededError) as info:
                await client.get("http://b/")
    finally:
        current_deadline.reset(token)
    assert info.value.from_caller
