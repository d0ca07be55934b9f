"""The control plane's key-value store: revisions, TTL keys, compare-and-put and prefix watches.

The control plane talks only to the ``Store`` protocol, so one replica on a local
directory (``FileStore``) and several replicas sharing etcd (``EtcdStore``) run the same
code. Both number every change with one store-wide revision, like etcd: a reader takes a
snapshot with ``range``/``get``, then ``watch``es from ``revision + 1`` and misses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import heapq
import json
import logging
import os
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import quote

from .._exceptions import MeshError

__all__ = ["Entry", "Event", "FileStore", "Store", "StoreError", "open_store"]

log = logging.getLogger("meshlib.control")


class StoreError(MeshError):
    """The store cannot do what was asked: unreachable, locked by another process, history compacted."""


@dataclass(frozen=True)
class Entry:
    """A key's value and its mod revision (the store revision of its last change)."""

    key: str
    value: dict[str, Any]
    revision: int


@dataclass(frozen=True)
class Event:
    """One change seen by a watch; ``value`` is None for a delete (or a TTL expiry)."""

    type: Literal["put", "delete"]
    key: str
    value: dict[str, Any] | None
    revision: int


class Store(Protocol):
    """What the control plane needs from its storage; see FileStore and EtcdStore."""

    async def start(self) -> None:
        """Connect or load; raises StoreError with the reason when the store cannot be used."""

    async def close(self) -> None:
        """Release the store; running watches end. ``start()`` may be called again afterwards."""

    async def get(self, key: str) -> Entry | None: ...

    async def range(self, prefix: str) -> list[Entry]:
        """Every key starting with ``prefix``, sorted by key."""

    async def put(self, key: str, value: dict[str, Any], *, ttl: float | None = None) -> int:
        """Store ``value``; return the key's mod revision.

        With ``ttl`` the key disappears ``ttl`` seconds after the last put unless put again;
        putting the same value again only refreshes the TTL (no new revision, no watch event).
        """

    async def compare_and_put(self, key: str, value: dict[str, Any], expected_revision: int) -> bool:
        """Store ``value`` only if the key's mod revision is ``expected_revision`` (0: the key must not exist)."""

    async def delete(self, key: str) -> bool:
        """Remove the key; False when there was none."""

    def watch(self, prefix: str, start_revision: int) -> AsyncGenerator[Event, None]:
        """Every put/delete/expiry under ``prefix`` from ``start_revision`` on (<= 0: from now), in order.

        Raises StoreError when that history is gone (compacted): resync with ``range()``. A
        generator, so ``contextlib.aclosing`` can end it (and its etcd stream) at once.
        """

    @property
    def revision(self) -> int:
        """The store revision as of the last ``get``/``range``."""


def open_store(url: str | None, state_dir: Path) -> Store:
    """The store a ``--store`` URL names.

    ``None`` or ``file://`` → FileStore(state_dir); ``file:///some/dir`` → FileStore of that
    directory; ``etcd://host:port,host:port[/prefix/]`` → EtcdStore over those members.
    """
    if url is None or url in ("", "file://"):
        return FileStore(state_dir)
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise StoreError(f"store URL {url!r}: use file://DIR or etcd://HOST:PORT[,HOST:PORT...]")
    scheme = scheme.lower()
    if scheme == "file":
        return FileStore(Path(rest))
    if scheme in ("etcd", "etcd+http", "etcd+https"):
        hosts, slash, path = rest.partition("/")
        endpoints = [h.strip() for h in hosts.split(",") if h.strip()]
        if not endpoints:
            raise StoreError(f"store URL {url!r} names no etcd member: use etcd://HOST:PORT[,HOST:PORT...]")
        if scheme == "etcd+https":
            endpoints = [f"https://{e}" for e in endpoints]
        from ._etcd import EtcdStore

        prefix = "/" + path if slash and path else "/meshlib/"
        if not prefix.endswith("/"):
            prefix += "/"
        return EtcdStore(endpoints, prefix=prefix)
    raise StoreError(f"store URL {url!r}: unknown scheme {scheme!r} (use file:// or etcd://)")


def encode_value(key: str, value: dict[str, Any]) -> str:
    """The canonical JSON of a value: equal dicts give equal text (the same-value TTL refresh relies on it)."""
    if not isinstance(value, dict):
        raise StoreError(f"value of {key!r} must be a dict, not {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"value of {key!r} is not JSON: {exc}") from exc


def _decode(text: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(text)
    return value


# -- FileStore -------------------------------------------------------------------------


@dataclass
class _Item:
    text: str  # canonical JSON of the value
    revision: int
    deadline: float | None  # clock() time the TTL key expires; None: persisted


@dataclass(frozen=True)
class _Record:
    """One change in the in-memory history (values kept as text: every watcher decodes its own copy)."""

    type: Literal["put", "delete"]
    key: str
    text: str | None
    revision: int

    def event(self) -> Event:
        return Event(self.type, self.key, None if self.text is None else _decode(self.text), self.revision)


_CLOSED = object()
_OVERFLOW = object()


class _Watcher:
    def __init__(self, prefix: str, start: int) -> None:
        self.prefix = prefix
        self.start = start
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.overflowed = False


class FileStore:
    """A store in ``state_dir/store`` for one control-plane process.

    Keys without TTL are files (``keys/<quoted key>.json``, written to a temporary file,
    fsynced and renamed, so a crash leaves the old or the new value, never half of one).
    TTL keys live in memory only: after a restart the data planes' heartbeats put them
    back. The store revision is persisted too (in the key files, and in ``revision`` for
    deletes and TTL changes), so it never goes backwards across restarts.

    Watches replay from an in-memory history of the last ``history`` changes; a watch
    from before it (or from before a restart) raises StoreError. ``clock`` and
    ``sweep()`` let tests expire TTL keys without sleeping.
    """

    def __init__(
        self,
        state_dir: Path | str,
        *,
        clock: Callable[[], float] = time.monotonic,
        sweep_interval: float = 0.5,
        history: int = 10_000,
        watch_backlog: int = 100_000,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.directory = self.state_dir / "store"
        self._keys_dir = self.directory / "keys"
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._history_size = max(1, history)
        self._watch_backlog = watch_backlog
        self._items: dict[str, _Item] = {}
        self._deadlines: dict[str, float] = {}
        self._due: list[tuple[float, str]] = []  # a heap over _deadlines; entries a refresh replaced are skipped
        self._revision = 0
        self._read_revision = 0
        self._history: deque[_Record] = deque()
        self._history_start = 1  # every change with revision >= this is in _history
        self._watchers: set[_Watcher] = set()
        self._lock_fd: int | None = None
        self._lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"FileStore({str(self.state_dir)!r})"

    @property
    def revision(self) -> int:
        return self._read_revision

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._lock_fd is not None:
            return
        try:
            self._keys_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store directory {self.directory}: {exc}") from exc
        self._lock_fd = self._take_lock()
        try:
            items, revision = await asyncio.to_thread(self._load)
        except BaseException:
            self._release_lock()
            raise
        self._items = items
        self._deadlines = {}
        self._due = []
        self._revision = self._read_revision = revision
        self._history = deque()
        self._history_start = revision + 1
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name=f"meshlib-filestore-sweep {self.directory}")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for watcher in list(self._watchers):
            watcher.queue.put_nowait(_CLOSED)
        self._watchers.clear()
        self._release_lock()

    def _take_lock(self) -> int:
        path = self.directory / "lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open the store lock {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            who = f" (pid {holder})" if holder else ""
            raise StoreError(
                f"the state directory {self.state_dir} is in use by another control plane{who}: a file store "
                f"serves one process only; stop the other one, use another state directory, or share an etcd store"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _ready(self) -> tuple[asyncio.Lock, asyncio.Event]:
        if self._lock_fd is None or self._lock is None or self._wake is None:
            raise StoreError(f"{self!r} is not started")
        return self._lock, self._wake

    # -- disk ----------------------------------------------------------------------------

    def _load(self) -> tuple[dict[str, _Item], int]:
        revision = 0
        meta = self.directory / "revision"
        try:
            revision = int(json.loads(meta.read_text(encoding="utf-8"))["revision"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"cannot read the store revision {meta}: {exc}") from exc
        items: dict[str, _Item] = {}
        for path in self._keys_dir.iterdir():
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write that a crash interrupted: never acknowledged
                continue
            if not path.name.endswith(".json"):
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                key, rev, value = data["key"], int(data["revision"]), data["value"]
                if not isinstance(key, str) or not isinstance(value, dict):
                    raise TypeError("key must be a string and value an object")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise StoreError(f"cannot read the stored key file {path}: {exc}") from exc
            if key not in items or items[key].revision < rev:
                items[key] = _Item(encode_value(key, value), rev, None)
            revision = max(revision, rev)
        return items, revision

    def _path(self, key: str) -> Path:
        name = quote(key, safe="")
        if len(name) > 200:  # file names stop at 255 bytes; '#' never appears in a quoted name
            name = "#" + hashlib.sha256(key.encode()).hexdigest()
        return self._keys_dir / (name + ".json")

    def _fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_atomic(self, path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _write_key(self, key: str, text: str, revision: int) -> None:
        body = f'{{"key":{json.dumps(key, ensure_ascii=False)},"revision":{revision},"value":{text}}}\n'
        self._write_atomic(self._path(key), body)
        self._fsync_dir(self._keys_dir)

    def _write_revision(self, revision: int, unlink: str | None = None) -> None:
        """Persist the revision first, then drop a key's file: a crash in between keeps the old value."""
        self._write_atomic(self.directory / "revision", f'{{"revision":{revision}}}\n')
        self._fsync_dir(self.directory)
        if unlink is not None:
            self._path(unlink).unlink(missing_ok=True)
            self._fsync_dir(self._keys_dir)

    async def _disk(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            await asyncio.to_thread(fn, *args)
        except OSError as exc:
            raise StoreError(f"cannot write the store in {self.directory}: {exc}") from exc

    # -- changes -------------------------------------------------------------------------

    def _commit(self, record: _Record, item: _Item | None) -> None:
        """Apply a change already on disk: memory, history, watchers."""
        if item is None:
            self._items.pop(record.key, None)
            self._deadlines.pop(record.key, None)
        else:
            self._items[record.key] = item
            if item.deadline is None:
                self._deadlines.pop(record.key, None)
            else:
                self._set_deadline(record.key, item.deadline)
        self._revision = record.revision
        self._history.append(record)
        while len(self._history) > self._history_size:
            self._history_start = self._history.popleft().revision + 1
        for watcher in list(self._watchers):
            if watcher.overflowed or record.revision < watcher.start or not record.key.startswith(watcher.prefix):
                continue
            if watcher.queue.qsize() >= self._watch_backlog:
                watcher.overflowed = True
                watcher.queue.put_nowait(_OVERFLOW)
            else:
                watcher.queue.put_nowait(record)

    def _set_deadline(self, key: str, deadline: float) -> None:
        self._deadlines[key] = deadline
        heapq.heappush(self._due, (deadline, key))

    def _next_deadline(self) -> float | None:
        """The earliest live deadline (dropping heap entries that a refresh or a delete made stale)."""
        while self._due:
            deadline, key = self._due[0]
            if self._deadlines.get(key) == deadline:
                return deadline
            heapq.heappop(self._due)
        return None

    async def _expire_locked(self, now: float) -> None:
        # TTL keys live in memory only (heartbeats bring them back after a restart), so expiring
        # them writes nothing to disk: a thousand data planes' statuses cost no fsync.
        while (deadline := self._next_deadline()) is not None and deadline <= now:
            _, key = heapq.heappop(self._due)
            self._commit(_Record("delete", key, None, self._revision + 1), None)

    async def sweep(self) -> None:
        """Expire the TTL keys whose time has come (the background sweeper calls this too)."""
        lock, _ = self._ready()
        now = self._clock()
        deadline = self._next_deadline()
        if deadline is None or deadline > now:
            return
        async with lock:
            await self._expire_locked(self._clock())

    async def _sweep_loop(self) -> None:
        _, wake = self._ready()
        while True:
            now = self._clock()
            delay = self._sweep_interval
            deadline = self._next_deadline()
            if deadline is not None:
                delay = max(0.0, min(delay, deadline - now))
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), delay)
            try:
                await self.sweep()
            except StoreError as exc:
                log.warning("cannot expire TTL keys: %s", exc)
                await asyncio.sleep(self._sweep_interval)

    async def put(self, key: str, value: dict[str, Any], *, ttl: float | None = None) -> int:
        text = encode_value(key, value)
        if ttl is not None and not ttl > 0:
            raise StoreError(f"ttl of {key!r} must be positive, not {ttl}")
        lock, wake = self._ready()
        async with lock:
            now = self._clock()
            await self._expire_locked(now)
            current = self._items.get(key)
            if ttl is not None and current is not None and current.deadline is not None and current.text == text:
                current.deadline = now + ttl  # a heartbeat: no change, no event
                self._set_deadline(key, current.deadline)
                return current.revision
            revision = self._revision + 1
            if ttl is None:
                await self._disk(self._write_key, key, text, revision)
            elif current is not None and current.deadline is None:  # a persisted key becomes a TTL key
                await self._disk(self._write_revision, revision, key)
            # else: a TTL key, memory only. Its revision is not persisted: after a restart a number may be
            # used again, which no one can see (TTL keys and the watch history do not survive a restart).
            item = _Item(text, revision, None if ttl is None else now + ttl)
            self._commit(_Record("put", key, text, revision), item)
            if ttl is not None:
                wake.set()
            return revision

    async def compare_and_put(self, key: str, value: dict[str, Any], expected_revision: int) -> bool:
        text = encode_value(key, value)
        if expected_revision < 0:
            raise StoreError(f"expected revision of {key!r} must be >= 0, not {expected_revision}")
        lock, _ = self._ready()
        async with lock:
            await self._expire_locked(self._clock())
            current = self._items.get(key)
            if (0 if current is None else current.revision) != expected_revision:
                return False
            revision = self._revision + 1
            await self._disk(self._write_key, key, text, revision)
            self._commit(_Record("put", key, text, revision), _Item(text, revision, None))
            return True

    async def delete(self, key: str) -> bool:
        lock, _ = self._ready()
        async with lock:
            await self._expire_locked(self._clock())
            current = self._items.get(key)
            if current is None:
                return False
            revision = self._revision + 1
            if current.deadline is None:
                await self._disk(self._write_revision, revision, key)
            self._commit(_Record("delete", key, None, revision), None)
            return True

    # -- reads ---------------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        await self.sweep()
        self._read_revision = self._revision
        item = self._items.get(key)
        return None if item is None else Entry(key, _decode(item.text), item.revision)

    async def range(self, prefix: str) -> list[Entry]:
        await self.sweep()
        self._read_revision = self._revision
        return [
            Entry(k, _decode(item.text), item.revision)
            for k, item in sorted(self._items.items())
            if k.startswith(prefix)
        ]

    async def watch(self, prefix: str, start_revision: int) -> AsyncGenerator[Event, None]:
        self._ready()
        start = self._revision + 1 if start_revision <= 0 else start_revision
        if start < self._history_start and start <= self._revision:
            raise StoreError(
                f"cannot watch {self.directory} from revision {start}: the history kept starts at revision "
                f"{self._history_start} (older changes are gone after a restart); read the state again"
            )
        watcher = _Watcher(prefix, start)
        backlog = [r for r in self._history if r.revision >= start and r.key.startswith(prefix)]
        self._watchers.add(watcher)  # no await since the backlog was taken: nothing falls in between
        try:
            for record in backlog:
                yield record.event()
            while True:
                item = await watcher.queue.get()
                if item is _CLOSED:
                    return
                if item is _OVERFLOW:
                    raise StoreError(
                        f"a watch of {prefix!r} fell more than {self._watch_backlog} changes behind; "
                        "read the state again"
                    )
                assert isinstance(item, _Record)
                yield item.event()
        finally:
            self._watchers.discard(watcher)
