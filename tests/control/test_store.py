"""The control plane's Store: one contract for FileStore and EtcdStore, then what each adds.

The etcd tests run against a real 3-member cluster (one per module), kill members
mid-stream and check that no acknowledged write is lost and no watch event is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _upstreams import free_port

from meshlib.control._etcd import EtcdStore
from meshlib.control._store import Event, FileStore, Store, StoreError, open_store

from ._etcd import EtcdCluster


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"))
    yield cluster
    cluster.stop()


def etcd_store(endpoints: list[str], prefix: str, **options: Any) -> EtcdStore:
    return EtcdStore(endpoints, prefix=prefix, **{"timeout": 5.0, "attempt_timeout": 1.0, **options})


class Harness:
    """One store under test, plus what differs between kinds: other clients, time, history loss."""

    def __init__(self, kind: str, tmp_path: Path, cluster: EtcdCluster | None) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.cluster = cluster
        self.clock = FakeClock()
        self.prefix = f"/test-{uuid.uuid4().hex[:8]}/"
        self.stores: list[Store] = []
        self.store = self._new()

    def _new(self) -> Store:
        store: Store
        if self.cluster is None:
            store = FileStore(self.tmp_path, clock=self.clock)
        else:
            store = etcd_store(self.cluster.endpoints, self.prefix)
        self.stores.append(store)
        return store

    async def client(self) -> Store:
        """Another client of the same data (a FileStore serves one process: the same store)."""
        if self.cluster is None:
            return self.store
        store = self._new()
        await store.start()
        return store

    async def elapse(self, seconds: float) -> None:
        if self.cluster is None:
            self.clock.now += seconds
            await asyncio.sleep(0)
            assert isinstance(self.store, FileStore)
            await self.store.sweep()
        else:
            await asyncio.sleep(seconds)

    async def forget_history(self) -> None:
        """FileStore keeps its history in memory (a restart loses it); etcd compacts."""
        if self.cluster is None:
            await self.store.close()
            self.store = self._new()
            await self.store.start()
        else:
            await asyncio.to_thread(self.cluster.compact)

    async def close(self) -> None:
        for store in self.stores:
            await store.close()


@pytest.fixture(params=["file", "etcd"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    cluster = request.getfixturevalue("etcd") if request.param == "etcd" else None
    h = Harness(request.param, tmp_path, cluster)
    await h.store.start()
    yield h
    await h.close()


async def next_event(events: AsyncIterator[Event], timeout: float = 5.0) -> Event:
    return await asyncio.wait_for(anext(events), timeout)


# -- the contract ------------------------------------------------------------------------


async def test_get_range_put_delete(harness: Harness) -> None:
    store = harness.store
    assert await store.get("config") is None
    r1 = await store.put("config", {"version": 1, "resources": []})
    r2 = await store.put("registry/b", {"n": 2})
    r3 = await store.put("registry/a", {"n": 1, "nested": {"ü": [1, 2.5, None, True]}})
    assert r1 < r2 < r3

    entry = await store.get("config")
    assert entry is not None
    assert (entry.key, entry.value, entry.revision) == ("config", {"version": 1, "resources": []}, r1)
    assert store.revision >= r3
    assert [(e.key, e.value["n"], e.revision) for e in await store.range("registry/")] == [
        ("registry/a", 1, r3),
        ("registry/b", 2, r2),
    ]
    assert (await store.range("registry/a"))[0].value["nested"] == {"ü": [1, 2.5, None, True]}
    assert [e.key for e in await store.range("")] == ["config", "registry/a", "registry/b"]
    assert await store.range("nothing/") == []

    entry.value["version"] = 99  # entries are copies: changing one changes nothing stored
    again = await store.get("config")
    assert again is not None
    assert again.value["version"] == 1

    r4 = await store.put("config", {"version": 2})
    assert r4 > r3
    assert await store.delete("registry/a") is True
    assert await store.delete("registry/a") is False
    assert [e.key for e in await store.range("registry/")] == ["registry/b"]
    with pytest.raises(StoreError, match="not JSON"):
        await store.put("bad", {"x": object()})


async def test_compare_and_put(harness: Harness) -> None:
    store = harness.store
    assert await store.compare_and_put("ca", {"pem": "one"}, 0) is True  # create-only
    assert await store.compare_and_put("ca", {"pem": "two"}, 0) is False
    entry = await store.get("ca")
    assert entry is not None
    assert entry.value == {"pem": "one"}

    assert await store.compare_and_put("ca", {"pem": "three"}, entry.revision + 1000) is False
    assert await store.compare_and_put("ca", {"pem": "three"}, entry.revision) is True
    assert await store.compare_and_put("ca", {"pem": "four"}, entry.revision) is False  # stale now
    latest = await store.get("ca")
    assert latest is not None
    assert latest.value == {"pem": "three"}
    assert latest.revision > entry.revision

    assert await store.delete("ca")
    assert await store.compare_and_put("ca", {"pem": "five"}, 0) is True  # gone again: create-only works


async def test_concurrent_writers_exactly_one_wins(harness: Harness) -> None:
    stores = [harness.store, await harness.client()]
    created = await asyncio.gather(*(stores[i % 2].compare_and_put("leader", {"who": i}, 0) for i in range(10)))
    assert created.count(True) == 1
    entry = await stores[1].get("leader")
    assert entry is not None
    assert entry.value == {"who": created.index(True)}

    updated = await asyncio.gather(
        *(stores[i % 2].compare_and_put("leader", {"who": 100 + i}, entry.revision) for i in range(10))
    )
    assert updated.count(True) == 1
    final = await stores[0].get("leader")
    assert final is not None
    assert final.value == {"who": 100 + updated.index(True)}


async def test_ttl_key_refreshes_without_event_then_expires_with_delete_event(harness: Harness) -> None:
    store, other = harness.store, await harness.client()
    await store.range("")
    async with contextlib.aclosing(store.watch("registry/", store.revision + 1)) as events:
        revision = await store.put("registry/x", {"address": "10.0.0.1"}, ttl=1.0)
        first = await next_event(events)
        assert (first.type, first.key, first.value, first.revision) == (
            "put",
            "registry/x",
            {"address": "10.0.0.1"},
            revision,
        )

        for client in (store, other, store):  # heartbeats, from this client or another: same revision, no event
            await harness.elapse(0.6)
            assert await client.put("registry/x", {"address": "10.0.0.1"}, ttl=1.0) == revision
        entry = await store.get("registry/x")  # 1.8 s after the first put: kept alive by the heartbeats
        assert entry is not None
        assert entry.revision == revision

        await harness.elapse(1.1)
        gone = await next_event(events, timeout=5.0)  # the very next event: the heartbeats made none
        assert (gone.type, gone.key, gone.value) == ("delete", "registry/x", None)
        assert gone.revision > revision
        assert await store.get("registry/x") is None

        # A new value with a TTL is a change: new revision, put event.
        changed = await store.put("registry/x", {"address": "10.0.0.2"}, ttl=30)
        assert changed > gone.revision
        assert await store.put("registry/x", {"address": "10.0.0.3"}, ttl=30) > changed
        assert [(e.type, e.value) for e in [await next_event(events), await next_event(events)]] == [
            ("put", {"address": "10.0.0.2"}),
            ("put", {"address": "10.0.0.3"}),
        ]
        # A plain put makes a TTL key a lasting one.
        await store.put("registry/x", {"address": "10.0.0.3"})
        await harness.elapse(0.2 if harness.kind == "etcd" else 31)
        assert await store.get("registry/x") is not None


async def test_watch_from_a_revision_sees_every_change_in_order(harness: Harness) -> None:
    store = harness.store
    await store.put("other", {"n": 0})
    await store.range("")
    start = store.revision + 1
    await store.put("cfg/a", {"n": 1})
    await store.put("outside", {"n": 1})
    await store.put("cfg/b", {"n": 2})
    await store.delete("cfg/a")
    await store.compare_and_put("cfg/c", {"n": 3}, 0)

    async with contextlib.aclosing(store.watch("cfg/", start)) as events:
        seen = [await next_event(events) for _ in range(4)]
        await store.put("cfg/d", {"n": 4})  # live changes follow the replayed ones
        await store.delete("cfg/b")
        seen += [await next_event(events), await next_event(events)]
    assert [(e.type, e.key, e.value) for e in seen] == [
        ("put", "cfg/a", {"n": 1}),
        ("put", "cfg/b", {"n": 2}),
        ("delete", "cfg/a", None),
        ("put", "cfg/c", {"n": 3}),
        ("put", "cfg/d", {"n": 4}),
        ("delete", "cfg/b", None),
    ]
    revisions = [e.revision for e in seen]
    assert revisions == sorted(set(revisions))
    assert revisions[0] > start - 1

    # From "now" (0): only what comes next.
    async with contextlib.aclosing(store.watch("cfg/", 0)) as events:
        waiting = asyncio.ensure_future(next_event(events))
        await asyncio.sleep(0.2)  # let the watch start before the change
        await store.put("cfg/e", {"n": 5})
        event = await waiting
    assert (event.key, event.value) == ("cfg/e", {"n": 5})


async def test_watch_from_forgotten_history_raises(harness: Harness) -> None:
    store = harness.store
    await store.put("k", {"n": 1})
    old = await store.put("k", {"n": 2})
    await store.put("k", {"n": 3})
    await harness.forget_history()
    store = harness.store
    with pytest.raises(StoreError, match=r"revision|compacted"):
        async with contextlib.aclosing(store.watch("", old)) as events:
            await next_event(events)
    # The way out: read the state again and watch from there.
    assert (await store.range(""))[0].value == {"n": 3}
    async with contextlib.aclosing(store.watch("", store.revision + 1)) as events:
        await store.put("k", {"n": 4})
        assert (await next_event(events)).value == {"n": 4}


async def test_close_ends_a_running_watch(harness: Harness) -> None:
    store = harness.store
    seen: list[Event] = []

    async def follow() -> None:
        async for event in store.watch("", 0):
            seen.append(event)

    task = asyncio.ensure_future(follow())
    await asyncio.sleep(0.2)
    await store.put("k", {"n": 1})
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.02)
    await store.close()
    await asyncio.wait_for(task, 5)  # ends quietly, no error
    assert [e.key for e in seen] == ["k"]
    with pytest.raises(StoreError, match="not started"):
        await store.get("k")


# -- FileStore -------------------------------------------------------------------------


async def test_file_store_survives_a_restart(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    await store.start()
    await store.put("config", {"version": 3})
    await store.put("history/00000001", {"v": 1})
    await store.put("history/00000002", {"v": 2})
    await store.delete("history/00000001")
    await store.put("registry/r1", {"ttl": True}, ttl=30)  # memory only
    long_key = "tokens/" + "x" * 300  # longer than a file name may be
    await store.put(long_key, {"long": True})
    await store.range("")
    before = {e.key: e for e in await store.range("")}
    last = store.revision
    await store.close()

    again = FileStore(tmp_path)
    await again.start()
    try:
        after = {e.key: e for e in await again.range("")}
        assert set(after) == {"config", "history/00000002", long_key}  # the TTL key is gone
        for key, entry in after.items():
            assert entry == before[key]
        assert again.revision == last  # the revision never goes back, even past deletes and TTL keys
        assert await again.put("config", {"version": 4}) == last + 1
        assert not list((tmp_path / "store" / "keys").glob("*.tmp"))
    finally:
        await again.close()


async def test_file_store_refuses_a_second_instance_on_the_same_dir(tmp_path: Path) -> None:
    first = FileStore(tmp_path)
    await first.start()
    second = FileStore(tmp_path)
    with pytest.raises(StoreError, match="in use by another control plane") as info:
        await second.start()
    assert str(tmp_path) in str(info.value)
    await first.close()
    await second.start()  # the lock goes with the first store
    await second.close()


async def test_file_store_expires_ttl_keys_on_its_own(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    await store.start()
    try:
        revision = await store.put("registry/r", {"a": 1}, ttl=0.2)
        async with contextlib.aclosing(store.watch("registry/", revision + 1)) as events:
            event = await next_event(events, timeout=3.0)
        assert (event.type, event.key, event.revision) == ("delete", "registry/r", revision + 1)
    finally:
        await store.close()


def test_open_store(tmp_path: Path) -> None:
    default = open_store(None, tmp_path)
    assert isinstance(default, FileStore)
    assert default.state_dir == tmp_path
    elsewhere = open_store(f"file://{tmp_path / 'other'}", tmp_path)
    assert isinstance(elsewhere, FileStore)
    assert elsewhere.state_dir == tmp_path / "other"
    etcd = open_store("etcd://127.0.0.1:2379,10.0.0.2:2379", tmp_path)
    assert isinstance(etcd, EtcdStore)
    assert etcd.endpoints == ["http://127.0.0.1:2379", "http://10.0.0.2:2379"]
    assert etcd.prefix == "/meshlib/"
    assert isinstance(prefixed := open_store("etcd://h:1/mesh-a", tmp_path), EtcdStore)
    assert prefixed.prefix == "/mesh-a/"
    with pytest.raises(StoreError, match="unknown scheme"):
        open_store("redis://h:1", tmp_path)


# -- EtcdStore -------------------------------------------------------------------------


def _prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:8]}/"


async def test_etcd_every_member_down_is_a_clear_error(etcd: EtcdCluster) -> None:
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    store = etcd_store(dead, _prefix(), timeout=0.5)
    with pytest.raises(StoreError, match="etcd is unavailable") as info:
        await store.start()
    for endpoint in dead:
        assert endpoint in str(info.value)

    # One dead member first in the list: the store goes on to the next.
    store = etcd_store([dead[0], *etcd.endpoints], _prefix())
    await store.start()
    try:
        assert await store.put("k", {"ok": True}) > 0
    finally:
        await store.close()


class KillDuringTransaction(httpx.AsyncBaseTransport):
    """Kills an etcd member right after the ``at``-th transaction left, before its answer comes back."""

    def __init__(self, kill: Callable[[], None], at: int) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.kill = kill
        self.at = at
        self.sent = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v3/kv/txn":
            return await self.inner.handle_async_request(request)
        self.sent += 1
        if self.sent != self.at:
            return await self.inner.handle_async_request(request)
        sending = asyncio.ensure_future(self.inner.handle_async_request(request))
        for _ in range(3):
            await asyncio.sleep(0)  # the request is written, etcd is on it
        self.kill()
        return await sending

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_etcd_no_lost_write_when_the_leader_dies(etcd: EtcdCluster) -> None:
    leader = etcd.leader()
    endpoints = etcd.endpoints
    order = [leader] + [i for i in range(3) if i != leader]
    prefix = _prefix()
    killer = KillDuringTransaction(lambda: etcd.kill(leader), at=40)
    a = etcd_store([endpoints[i] for i in order], prefix, transport=killer)  # talks to the leader
    b = etcd_store([endpoints[i] for i in order[1:] + order[:1]], prefix)  # talks to a follower
    await a.start()
    await b.start()
    wins: list[int] = []
    attempts = 0

    async def increment(store: EtcdStore) -> None:
        nonlocal attempts
        while len(wins) < 200:
            entry = await store.get("counter")
            n, revision = (entry.value["n"], entry.revision) if entry else (0, 0)
            attempts += 1
            if await store.compare_and_put("counter", {"n": n + 1}, revision):
                wins.append(n + 1)

    try:
        await asyncio.wait_for(asyncio.gather(increment(a), increment(b)), 30)
        assert killer.sent > killer.at  # the leader died with a transaction in flight, and a went on
        assert attempts > len(wins)  # the two clients did compete
        final = await b.get("counter")
        assert final is not None
        assert final.value["n"] == len(wins)  # every acknowledged increment is there, none twice
        assert sorted(wins) == list(range(1, len(wins) + 1))
    finally:
        await a.close()
        await b.close()
        await asyncio.to_thread(etcd.restart, leader)


async def test_etcd_watch_continues_across_a_member_kill(etcd: EtcdCluster) -> None:
    victim = etcd.leader()
    endpoints = etcd.endpoints
    rest = [endpoints[i] for i in range(3) if i != victim]
    prefix = _prefix()
    watcher = etcd_store([endpoints[victim], *rest], prefix)  # the watch starts on the victim
    writer = etcd_store([*rest, endpoints[victim]], prefix)
    await watcher.start()
    await writer.start()
    try:
        await watcher.range("")
        seen: list[Event] = []
        async with contextlib.aclosing(watcher.watch("", watcher.revision + 1)) as events:
            for i in range(10):
                await writer.put(f"k{i:02}", {"i": i})
            seen += [await next_event(events) for _ in range(10)]
            etcd.kill(victim)
            for i in range(10, 20):
                await writer.put(f"k{i:02}", {"i": i})
            await writer.delete("k00")
            seen += [await next_event(events, timeout=10) for _ in range(11)]
        assert [(e.type, e.key) for e in seen] == [("put", f"k{i:02}") for i in range(20)] + [("delete", "k00")]
        revisions = [e.revision for e in seen]
        assert revisions == sorted(set(revisions))
    finally:
        await watcher.close()
        await writer.close()
        await asyncio.to_thread(etcd.restart, victim)


class CutAfterSending(httpx.AsyncBaseTransport):
    """Lets etcd apply a transaction, or not, then loses the answer: the client cannot know which."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.plan: list[tuple[bool, Callable[[], Awaitable[None]] | None]] = []  # (forward?, then run)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v3/kv/txn" and self.plan:
            forward, then = self.plan.pop(0)
            if forward:
                response = await self.inner.handle_async_request(request)
                await response.aread()
                await response.aclose()
            if then is not None:
                await then()
            raise httpx.ReadError("connection lost after sending", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_etcd_compare_and_put_with_a_lost_answer_is_resolved_exactly(etcd: EtcdCluster) -> None:
    prefix = _prefix()
    cut = CutAfterSending()
    a = etcd_store(etcd.endpoints, prefix, transport=cut)
    b = etcd_store(etcd.endpoints, prefix)
    await a.start()
    await b.start()
    try:
        # Applied, answer lost: True, written once.
        cut.plan = [(True, None)]
        assert await a.compare_and_put("n", {"n": 1}, 0) is True
        one = await b.get("n")
        assert one is not None
        assert one.value == {"n": 1}

        # Applied, answer lost, and another client wrote over it before the retry: still True.
        async def b_writes_next() -> None:
            latest = await b.get("n")
            assert latest is not None
            assert await b.compare_and_put("n", {"n": 3}, latest.revision)

        cut.plan = [(True, b_writes_next)]
        assert await a.compare_and_put("n", {"n": 2}, one.revision) is True

        # Not applied, and another client wrote the very value it meant to write: False.
        three = await b.get("n")
        assert three is not None

        async def b_writes_same() -> None:
            assert await b.compare_and_put("n", {"n": 4}, three.revision)

        cut.plan = [(False, b_writes_same)]
        assert await a.compare_and_put("n", {"n": 4}, three.revision) is False

        # A delete whose answer was lost: True once, and the key is gone.
        cut.plan = [(True, None)]
        assert await a.delete("n") is True
        assert await b.get("n") is None
        assert await a.delete("n") is False
    finally:
        await a.close()
        await b.close()
