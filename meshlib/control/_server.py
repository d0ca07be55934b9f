"""``ControlPlane``: the mesh's configuration, registry and CA behind an HTTP API, pushed to data planes.

Every replica keeps a copy of the store's state (configuration, registry, tokens, data
planes) fed by one watch, so a change written through any replica, or a workload
expiring from the registry, reaches the data planes subscribed to every replica. A push
is state of the world: each data plane gets the whole of what it needs, at once on
connect and again whenever that changes, and answers with an ACK or a NACK (xDS).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from .._exceptions import CertificateRequestError, Issue, PolicyError
from ..policy import SpiffeId, Workload
from ..security import CertificateAuthority
from ._config import (
    CONFIG_KEY,
    ConfigState,
    Configuration,
    apply_resources,
    delete_resources,
    parse_body,
    replace_resources,
)
from ._dashboard import dashboard_routes
from ._registry import Registration, merge_registry
from ._report import Reports
from ._store import Event, FileStore, Store, StoreError
from ._tokens import TOKENS_PREFIX, Principal, hash_token, new_token, principal_from

__all__ = ["ControlPlane", "DataPlaneStatus"]

log = logging.getLogger("meshlib.control")

REGISTRY_PREFIX = "registry/"
DATAPLANES_PREFIX = "dataplanes/"
_MAX_BODY = 4 * 1024 * 1024
_STATUS_FLUSH = 1.0


@dataclass
class DataPlaneStatus:
    """What the control plane knows of one data plane: what it was sent, what it runs, its last NACK."""

    node: str
    workload: str
    namespace: str
    service_account: str
    labels: dict[str, str]
    replica: str
    connected: bool = True
    connected_at: float = field(default_factory=time.time)
    sent_version: int | None = None
    sent_nonce: str | None = None
    sent_at: float | None = None
    acked_version: int | None = None
    acked_nonce: str | None = None
    acked_snapshot: str | None = None
    acked_at: float | None = None
    last_nack: dict[str, Any] | None = None
    seen_at: float = field(default_factory=time.time)

    @property
    def state(self) -> str:
        """ACKED (runs what it was sent), NACKED (refused it), PENDING (no answer yet) or DISCONNECTED."""
        if not self.connected:
            return "DISCONNECTED"
        if self.sent_nonce is not None and self.sent_nonce == self.acked_nonce:
            return "ACKED"
        if self.last_nack is not None and self.last_nack.get("nonce") == self.sent_nonce:
            return "NACKED"
        return "PENDING"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state}


@dataclass(frozen=True)
class _View:
    """What one kind of workload is sent for one state of the mesh, encoded once and shared."""

    version: int
    digest: str
    body: bytes  # the resources as a JSON array


class _Subscriber:
    __slots__ = ("gone", "key", "pending", "sent_digest", "sent_monotonic", "status", "wake", "workload")

    def __init__(self, status: DataPlaneStatus, workload: Workload) -> None:
        self.status = status
        self.workload = workload
        self.key = (workload.name, workload.namespace, workload.service_account, tuple(sorted(workload.labels.items())))
        self.wake = asyncio.Event()
        self.pending: _View | None = None
        self.sent_digest = ""
        self.sent_monotonic = 0.0
        self.gone = False


class ControlPlane:
    """The control plane of one mesh: serve ``app`` with uvicorn; ``start()`` before, ``stop()`` after."""

    def __init__(
        self,
        store: Store,
        *,
        ca: CertificateAuthority | None = None,
        admin_token: str | None = None,
        registry_ttl: float = 10.0,
        keepalive: float = 10.0,
        replica: str | None = None,
        certificate_ttl: float | None = None,
        view_token: str | None = None,
    ) -> None:
        self.store = store
        self.ca = ca
        self.registry_ttl = registry_ttl
        self.keepalive = keepalive
        self.replica = replica or secrets.token_hex(4)
        self.certificate_ttl = certificate_ttl
        self._configuration = Configuration(store)
        self._config = ConfigState.empty()
        self._registrations: dict[str, Registration] = {}
        self._tokens: dict[str, Principal] = {}
        self._local_admin: dict[str, Principal] = {}
        if admin_token:
            self._local_admin[hash_token(admin_token)] = Principal(True, "admin")
        self._viewers: set[str] = {hash_token(view_token)} if view_token else set()
        self.reports = Reports()
        """The data planes' last reports (RED per edge, breakers, certificates): the dashboard reads them."""
        self._remote_status: dict[str, dict[str, Any]] = {}
        self._subscribers: dict[str, _Subscriber] = {}
        self._status_dirty: set[str] = set()
        self._departed: dict[str, DataPlaneStatus] = {}
        self._views: dict[tuple[Any, ...], _View] = {}
        self._full: Any = None
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self._started = False
        self._draining = False
        self.metrics = CollectorRegistry(auto_describe=True)
        self._m_version = Gauge(
            "meshlib_controlplane_config_version", "Configuration version in force.", registry=self.metrics
        )
        Gauge(
            "meshlib_controlplane_subscribers", "Data planes streaming from this replica.", registry=self.metrics
        ).set_function(lambda: len(self._subscribers))
        Gauge(
            "meshlib_controlplane_registered_endpoints", "Live registered workload endpoints.", registry=self.metrics
        ).set_function(lambda: len(self._registrations))
        self._m_pushes = Counter("meshlib_controlplane_pushes", "Snapshots pushed.", registry=self.metrics)
        self._m_acks = Counter(
            "meshlib_controlplane_responses", "ACKs and NACKs received.", ["result"], registry=self.metrics
        )
        self._m_ack_time = Histogram(
            "meshlib_controlplane_push_to_ack_seconds",
            "From a push to its ACK.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.metrics,
        )
        self.app = self._build_app()

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Load the store's state and follow it; raises StoreError when the store is unreachable."""
        if self._started:
            return
        self._started = True
        self._draining = False
        self._dirty = asyncio.Event()
        self._ready = asyncio.Event()
        await self.store.start()
        revision = await self._resync()
        self._tasks = [
            asyncio.create_task(self._follow(revision), name="meshlib-cp-watch"),
            asyncio.create_task(self._push_loop(), name="meshlib-cp-push"),
            asyncio.create_task(self._flush_status_loop(), name="meshlib-cp-status"),
        ]
        self._ready.set()
        log.info(
            "control plane %s: configuration version %d, %d resources",
            self.replica,
            self.version,
            len(self._config.documents),
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        self._started = False
        for sub in list(self._subscribers.values()):
            sub.wake.set()
        await self.store.close()

    def drain(self) -> None:
        """End every stream now (before a shutdown): data planes reconnect, here later or to another replica."""
        self._draining = True
        for sub in list(self._subscribers.values()):
            sub.wake.set()

    @property
    def version(self) -> int:
        return self._config.version

    @property
    def config(self) -> ConfigState:
        return self._config

    # -- changes (the admin API calls these) -------------------------------------------

    async def apply(self, resources: Iterable[Any], *, who: str = "admin") -> int:
        """Create or update resources (models, or documents as YAML gives them) as one checked change."""
        from ..policy import Origin, parse_documents

        loaded = parse_documents([(r, Origin("<apply>", i)) for i, r in enumerate(resources)])
        errors = [i for i in loaded.issues if i.severity == "error"]
        if errors:
            raise PolicyError(errors)
        return await self._change(apply_resources(r for r, _ in loaded.resources), who, "apply")

    async def delete(self, ref: str, *, who: str = "admin") -> int:
        """Delete one resource by ``kind/namespace/name``; KeyError when there is none."""
        return await self._change(delete_resources([ref]), who, "delete")

    async def rollback(self, version: int, *, who: str = "admin") -> int:
        """Make the resources of an earlier version current again, as a new version."""
        docs = await self._configuration.at_version(version)
        if docs is None:
            raise KeyError(f"version {version} is not in the history")
        from ..policy import Origin, parse_documents

        loaded = parse_documents([(d, Origin(f"<version {version}>", i)) for i, d in enumerate(docs)])
        return await self._change(replace_resources(r for r, _ in loaded.resources), who, f"rollback to {version}")

    async def _change(self, mutate: Any, who: str, action: str) -> int:
        state, changes = await self._configuration.change(mutate, who=who, action=action)
        if changes:
            log.info(
                "configuration version %d by %s: %s", state.version, who, ", ".join(f"{c.op} {c.ref}" for c in changes)
            )
            self._set_config(state)
        return state.version

    async def history(self, *, with_resources: bool = False) -> list[dict[str, Any]]:
        return await self._configuration.history(with_resources=with_resources)

    async def create_token(self, namespace: str, service_account: str, *, admin: bool = False, name: str = "") -> str:
        """A new bootstrap token for one workload identity (or a named admin token); shown only here."""
        if admin:
            principal = Principal(True, name or "admin")
        else:
            Workload(service_account, namespace=namespace)  # the same name checks as everywhere
            principal = Principal(False, name or f"{namespace}/{service_account}", namespace, service_account)
        token = new_token()
        key = hash_token(token)
        await self.store.put(TOKENS_PREFIX + key, {**principal.to_dict(), "created": time.time()})
        self._tokens[key] = principal
        return token

    # -- the store's state -------------------------------------------------------------

    async def _resync(self) -> int:
        """Read everything at once; the watch continues from the revision this returns."""
        config_entry = await self.store.get(CONFIG_KEY)
        revision = self.store.revision
        if config_entry is not None:
            self._load_config(config_entry.value)
        registrations = {}
        for entry in await self.store.range(REGISTRY_PREFIX):
            reg = self._registration(entry.value)
            if reg is not None:
                registrations[entry.key[len(REGISTRY_PREFIX) :]] = reg
        self._registrations = registrations
        self._tokens = {
            e.key[len(TOKENS_PREFIX) :]: Principal.from_dict(e.value) for e in await self.store.range(TOKENS_PREFIX)
        }
        self._remote_status = {
            e.key[len(DATAPLANES_PREFIX) :]: e.value for e in await self.store.range(DATAPLANES_PREFIX)
        }
        self._dirty.set()  # the watch replays from the first read: anything written since is seen again
        return revision

    def _load_config(self, value: Mapping[str, Any]) -> None:
        if int(value.get("version", 0)) <= self._config.version:
            return
        try:
            state = ConfigState.from_stored(value)
        except PolicyError as exc:
            log.error(
                "stored configuration version %s does not load; keeping version %d: %s",
                value.get("version"),
                self._config.version,
                exc,
            )
            return
        self._set_config(state)

    def _set_config(self, state: ConfigState) -> None:
        if state.version <= self._config.version:
            return
        self._config = state
        self._m_version.set(state.version)
        self._dirty.set()

    @staticmethod
    def _registration(value: Mapping[str, Any]) -> Registration | None:
        try:
            return Registration.parse(value)
        except (ValueError, TypeError) as exc:
            log.warning("ignoring a stored registration that does not parse: %s", exc)
            return None

    async def _follow(self, revision: int) -> None:
        backoff = 0.1
        while True:
            try:
                async for event in self.store.watch("", revision + 1):
                    revision = max(revision, event.revision)
                    self._on_event(event)
                    backoff = 0.1
            except asyncio.CancelledError:
                raise
            except StoreError as exc:
                log.warning("store watch lost (%s); resynchronising", exc)
            except Exception:
                log.exception("store watch failed; resynchronising")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            with contextlib.suppress(StoreError):
                revision = await self._resync()

    def _on_event(self, event: Event) -> None:
        key = event.key
        if key == CONFIG_KEY:
            if event.value is not None:
                self._load_config(event.value)
        elif key.startswith(REGISTRY_PREFIX):
            rid = key[len(REGISTRY_PREFIX) :]
            if event.value is None:
                if self._registrations.pop(rid, None) is not None:
                    self._dirty.set()
            else:
                reg = self._registration(event.value)
                if reg is not None and self._registrations.get(rid) != reg:
                    self._registrations[rid] = reg
                    self._dirty.set()
        elif key.startswith(TOKENS_PREFIX):
            tid = key[len(TOKENS_PREFIX) :]
            if event.value is None:
                self._tokens.pop(tid, None)
            else:
                self._tokens[tid] = Principal.from_dict(event.value)
        elif key.startswith(DATAPLANES_PREFIX):
            node = key[len(DATAPLANES_PREFIX) :]
            if event.value is None:
                self._remote_status.pop(node, None)
            else:
                self._remote_status[node] = event.value

    # -- pushing -----------------------------------------------------------------------

    async def _push_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await asyncio.sleep(0.005)  # a burst of registrations becomes one push
            self._dirty.clear()
            try:
                self._recompute()
            except Exception:
                log.exception("could not compute the data planes' views")

    def _full_snapshot(self) -> Any:
        from ..policy import Snapshot

        config = self._config
        if not self._registrations:
            return config.snapshot
        docs = merge_registry(config.documents, self._registrations.values())
        try:
            return Snapshot.from_resources(docs)
        except PolicyError as exc:
            log.error("registered endpoints do not fit the configuration; pushing without them: %s", exc)
            return config.snapshot

    def _recompute(self) -> None:
        self._full = self._full_snapshot()
        self._views = {}
        for sub in list(self._subscribers.values()):
            self._offer(sub)

    def _view_for(self, sub: _Subscriber) -> _View:
        view = self._views.get(sub.key)
        if view is None:
            if self._full is None:
                self._full = self._full_snapshot()
            docs = [r.to_document() for r in self._full.scoped_to(sub.workload)]
            text = json.dumps(docs, separators=(",", ":"), sort_keys=True)
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            view = self._views[sub.key] = _View(self._config.version, digest, text.encode())
        return view

    def _offer(self, sub: _Subscriber) -> None:
        view = self._view_for(sub)
        if view.digest != sub.sent_digest:
            sub.pending = view
            sub.wake.set()

    async def _stream(self, sub: _Subscriber, send: Send) -> None:
        """Push to one data plane until it goes, or this replica drains.

        Each push is the view's shared body between a small per-push header and trailer,
        and nothing of it is kept once sent: a thousand idle streams hold no copies.
        """
        await send(_body(b": connected\n\n"))
        self._offer(sub)
        while self._started and not self._draining and not sub.gone:
            if not sub.wake.is_set():
                try:
                    async with asyncio.timeout(self.keepalive):
                        await sub.wake.wait()
                except TimeoutError:
                    await send(_body(b": keepalive\n\n"))
                    continue
            sub.wake.clear()
            view, sub.pending = sub.pending, None
            if view is None or sub.gone:
                continue
            nonce = secrets.token_hex(8)
            head = f'event: snapshot\nid: {nonce}\ndata: {{"version":{view.version},"nonce":"{nonce}","resources":'
            sub.sent_digest = view.digest
            sub.sent_monotonic = time.monotonic()
            status = sub.status
            status.sent_version, status.sent_nonce, status.sent_at = view.version, nonce, time.time()
            self._status_dirty.add(status.node)
            self._m_pushes.inc()
            await send(_body(head.encode() + view.body + b"}\n\n"))
        if not sub.gone:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _unsubscribe(self, sub: _Subscriber) -> None:
        node = sub.status.node
        if self._subscribers.get(node) is sub:
            del self._subscribers[node]
            sub.status.connected = False
            sub.status.seen_at = time.time()
            self._departed[node] = sub.status
            self._status_dirty.add(node)
            log.info("data plane %s disconnected", node)

    async def _flush_status_loop(self) -> None:
        """Share data-plane statuses through the store, so every replica lists every data plane.

        Only a shared store (etcd) needs them; with the embedded store this replica is the
        only one, and its memory is the list.
        """
        ttl = max(30.0, 3 * self.keepalive)
        shared = not isinstance(self.store, FileStore)
        limit = asyncio.Semaphore(16)

        async def put(node: str, status: DataPlaneStatus) -> None:
            async with limit:
                try:
                    await self.store.put(DATAPLANES_PREFIX + node, status.to_dict(), ttl=ttl)
                except StoreError as exc:
                    log.warning("could not record data plane %s: %s", node, exc)
                    self._status_dirty.add(node)

        while True:
            await asyncio.sleep(_STATUS_FLUSH)
            now = time.time()
            for node, departed in list(self._departed.items()):
                if now - departed.seen_at > ttl:
                    del self._departed[node]
            dirty, self._status_dirty = self._status_dirty, set()
            if not shared:
                continue
            writes = []
            for node in dirty:
                sub = self._subscribers.get(node)
                found = sub.status if sub is not None else self._departed.get(node)
                if found is not None:
                    found.seen_at = now
                    writes.append(put(node, found))
            await asyncio.gather(*writes)

    # -- HTTP --------------------------------------------------------------------------

    def _principal(self, request: Request) -> Principal | None:
        header = request.headers.get("authorization")
        principal = principal_from(header, self._local_admin)
        return principal or principal_from(header, self._tokens)

    def _build_app(self) -> Starlette:
        routes = [
            Route("/healthz", self._healthz, methods=["GET"]),
            Route("/metrics", self._h_metrics, methods=["GET"]),
            Route("/v1/stream", self._h_stream, methods=["GET"]),
            Route("/v1/ack", self._h_ack, methods=["POST"]),
            Route("/v1/register", self._h_register, methods=["POST"]),
            Route("/v1/register/{rid}", self._h_deregister, methods=["DELETE"]),
            Route("/v1/certificate", self._h_certificate, methods=["POST"]),
            Route("/v1/resources", self._h_resources, methods=["GET", "POST"]),
            Route("/v1/resources/{kind}/{namespace}/{name}", self._h_resource, methods=["GET", "DELETE"]),
            Route("/v1/history", self._h_history, methods=["GET"]),
            Route("/v1/rollback", self._h_rollback, methods=["POST"]),
            Route("/v1/dataplanes", self._h_dataplanes, methods=["GET"]),
            Route("/v1/registry", self._h_registry, methods=["GET"]),
            Route("/v1/tokens", self._h_tokens, methods=["POST"]),
            Route("/v1/tokens/revoke", self._h_revoke, methods=["POST"]),
            Route("/v1/report", self._h_report, methods=["POST"]),
            *dashboard_routes(self),
        ]
        return Starlette(routes=routes, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Served with uvicorn's lifespan on, the app starts and stops the control plane itself."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def _h_metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics), media_type=CONTENT_TYPE_LATEST)

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": self.version, "replica": self.replica})

    def _auth(self, request: Request, *, admin: bool) -> Principal | Response:
        principal = self._principal(request)
        if principal is None:
            return _error(401, "missing or unknown token: send Authorization: Bearer <token>")
        if admin and not principal.admin:
            return _error(403, "this needs an admin token")
        return principal

    async def _authed_json(self, request: Request, *, admin: bool) -> tuple[Principal, dict[str, Any]] | Response:
        """The caller's principal and JSON body, or the error answer for either."""
        principal = self._auth(request, admin=admin)
        if isinstance(principal, Response):
            return principal
        data = await self._json(request)
        return data if isinstance(data, Response) else (principal, data)

    async def _json(self, request: Request) -> dict[str, Any] | Response:
        body = await _read_body(request)
        if isinstance(body, Response):
            return body
        try:
            data = json.loads(body or b"{}")
        except ValueError as exc:
            return _error(400, f"the body is not JSON: {exc}")
        if not isinstance(data, dict):
            return _error(400, "the body must be a JSON object")
        return data

    # data-plane endpoints

    async def _h_stream(self, request: Request) -> Response:
        principal = self._auth(request, admin=False)
        if isinstance(principal, Response):
            return principal
        q = request.query_params
        try:
            labels = dict(_label(item) for item in q.getlist("label"))
            workload = Workload(
                q.get("workload", ""),
                namespace=q.get("namespace") or "default",
                labels=labels,
                service_account=q.get("service_account") or "",
            )
        except ValueError as exc:
            return _error(400, str(exc))
        if not principal.may_act_as(workload.namespace, workload.service_account):
            return _not_yours(principal, workload.namespace, workload.service_account)
        node = q.get("node") or f"{workload.name}.{workload.namespace}-{secrets.token_hex(4)}"
        status = DataPlaneStatus(
            node, workload.name, workload.namespace, workload.service_account, dict(labels), self.replica
        )
        old = self._subscribers.get(node)
        if old is not None:
            old.status.connected = False
            self._subscribers.pop(node, None)
            old.wake.set()
        sub = _Subscriber(status, workload)
        self._subscribers[node] = sub
        self._status_dirty.add(node)
        log.info("data plane %s (%s) subscribed", node, workload.spiffe_id)
        return _EventStream(self, sub)

    async def _h_ack(self, request: Request) -> Response:
        checked = await self._authed_json(request, admin=False)
        if isinstance(checked, Response):
            return checked
        principal, data = checked
        sub = self._own_subscriber(principal, data)
        if isinstance(sub, Response):
            return sub
        node, status = sub.status.node, sub.status
        nonce = data.get("nonce")
        error = data.get("error")
        if error:
            status.last_nack = {
                "version": data.get("version"),
                "nonce": nonce,
                "error": str(error)[:2000],
                "at": time.time(),
            }
            self._m_acks.labels("nack").inc()
            log.warning("data plane %s NACKed version %s: %s", node, data.get("version"), error)
        else:
            status.acked_version = data.get("version") if isinstance(data.get("version"), int) else None
            status.acked_nonce = str(nonce) if nonce is not None else None
            status.acked_snapshot = str(data.get("snapshot") or "") or None
            status.acked_at = time.time()
            self._m_acks.labels("ack").inc()
            if nonce == status.sent_nonce and sub.sent_monotonic:
                self._m_ack_time.observe(time.monotonic() - sub.sent_monotonic)
        self._status_dirty.add(node)
        return Response(status_code=204)

    async def _h_report(self, request: Request) -> Response:
        """A data plane's metrics summary (see ``_report``), kept in memory for the dashboard."""
        checked = await self._authed_json(request, admin=False)
        if isinstance(checked, Response):
            return checked
        principal, data = checked
        sub = self._own_subscriber(principal, data)
        if isinstance(sub, Response):
            return sub
        node = sub.status.node
        self.reports.add(node, data)
        return Response(status_code=204)

    def _own_subscriber(self, principal: Principal, data: dict[str, Any]) -> _Subscriber | Response:
        """The stream a data plane's ACK or report is about, if the caller may speak for it."""
        node = str(data.get("node", ""))
        sub = self._subscribers.get(node)
        if sub is None:
            return _error(404, f"no data plane {node!r} streams from this replica")
        if not principal.may_act_as(sub.status.namespace, sub.status.service_account):
            return _not_yours(principal, sub.status.namespace, sub.status.service_account)
        return sub

    def may_view(self, request: Request) -> bool:
        """An admin token or the view token (read-only: the dashboard's state, nothing else)."""
        header = request.headers.get("authorization")
        principal = self._principal(request)
        if principal is not None and principal.admin:
            return True
        if not self._viewers or not header or not header.lower().startswith("bearer "):
            return False
        return hash_token(header[len("bearer ") :].strip()) in self._viewers

    async def _h_register(self, request: Request) -> Response:
        checked = await self._authed_json(request, admin=False)
        if isinstance(checked, Response):
            return checked
        principal, data = checked
        try:
            reg = Registration.parse(data)
        except (ValueError, TypeError) as exc:
            return _error(400, f"bad registration: {exc}")
        if not principal.may_act_as(reg.namespace, reg.service_account):
            return _not_yours(principal, reg.namespace, reg.service_account)
        try:
            await self.store.put(REGISTRY_PREFIX + reg.id, reg.to_dict(), ttl=self.registry_ttl)
        except StoreError as exc:
            return _error(503, f"the store is unavailable: {exc}")
        if self._registrations.get(reg.id) != reg:
            self._registrations[reg.id] = reg
            self._dirty.set()
        return JSONResponse({"id": reg.id, "ttl": self.registry_ttl})

    async def _h_deregister(self, request: Request) -> Response:
        principal = self._auth(request, admin=False)
        if isinstance(principal, Response):
            return principal
        rid = request.path_params["rid"]
        reg = self._registrations.get(rid)
        if reg is not None and not principal.may_act_as(reg.namespace, reg.service_account):
            return _not_yours(principal, reg.namespace, reg.service_account)
        try:
            await self.store.delete(REGISTRY_PREFIX + rid)
        except StoreError as exc:
            return _error(503, f"the store is unavailable: {exc}")
        if self._registrations.pop(rid, None) is not None:
            self._dirty.set()
        return Response(status_code=204)

    async def _h_certificate(self, request: Request) -> Response:
        principal = self._auth(request, admin=False)
        if isinstance(principal, Response):
            return principal
        if self.ca is None:
            return _error(501, "this control plane has no CA")
        if principal.admin:
            return _error(403, "certificates are for workload tokens; an admin token has no workload identity")
        data = await self._json(request)
        if isinstance(data, Response):
            return data
        csr = data.get("csr")
        if not isinstance(csr, str):
            return _error(400, "csr: a PEM certificate signing request is required")
        identity = SpiffeId.of(principal.namespace, principal.service_account, self.ca.trust_domain)
        try:
            kwargs = {} if self.certificate_ttl is None else {"ttl": self.certificate_ttl}
            issued = await asyncio.to_thread(self.ca.sign, csr.encode(), identity=identity, **kwargs)
        except CertificateRequestError as exc:
            # A CSR that cannot be read is a bad request; one that asks for what the token may not have is refused.
            message = str(exc)
            unreadable = "not a PEM" in message or "cannot be read" in message or "signature is invalid" in message
            return _error(400 if unreadable else 403, message)
        log.info("issued a certificate for %s (serial %x)", identity, issued.serial)
        return JSONResponse(
            {
                "certificate_chain": issued.chain_pem.decode(),
                "root_certificates": issued.bundle_pem.decode(),
                "not_after": issued.not_after,
            }
        )

    # admin endpoints

    async def _h_resources(self, request: Request) -> Response:
        principal = self._auth(request, admin=True)
        if isinstance(principal, Response):
            return principal
        if request.method == "GET":
            kind = request.query_params.get("kind")
            docs = [d for d in self._config.documents if kind is None or d["kind"] == kind]
            return JSONResponse({"version": self.version, "resources": docs})
        body = await _read_body(request)
        if isinstance(body, Response):
            return body
        try:
            resources = parse_body(body.decode("utf-8", "replace"), "<request>")
            before = self.version
            version = await self._change(apply_resources(resources), str(principal), "apply")
        except PolicyError as exc:
            return _policy_error(exc)
        except StoreError as exc:
            return _error(503, f"the store is unavailable; nothing changed: {exc}")
        return JSONResponse({"version": version, "changed": version != before})

    async def _h_resource(self, request: Request) -> Response:
        principal = self._auth(request, admin=True)
        if isinstance(principal, Response):
            return principal
        p = request.path_params
        ref = f"{p['kind']}/{p['namespace']}/{p['name']}"
        if request.method == "GET":
            resource = self._config.snapshot.get(ref)
            if resource is None:
                return _error(404, f"no {ref}")
            return JSONResponse(resource.to_document())
        try:
            version = await self._change(delete_resources([ref]), str(principal), "delete")
        except KeyError:
            return _error(404, f"no {ref}")
        except PolicyError as exc:
            return _policy_error(exc)
        except StoreError as exc:
            return _error(503, f"the store is unavailable; nothing changed: {exc}")
        return JSONResponse({"version": version})

    async def _h_history(self, request: Request) -> Response:
        principal = self._auth(request, admin=True)
        if isinstance(principal, Response):
            return principal
        full = request.query_params.get("resources") in ("1", "true")
        return JSONResponse({"version": self.version, "history": await self.history(with_resources=full)})

    async def _h_rollback(self, request: Request) -> Response:
        checked = await self._authed_json(request, admin=True)
        if isinstance(checked, Response):
            return checked
        principal, data = checked
        target = data.get("version")
        if not isinstance(target, int) or isinstance(target, bool):
            return _error(400, "version: the integer version to roll back to is required")
        try:
            version = await self.rollback(target, who=str(principal))
        except KeyError as exc:
            return _error(404, str(exc.args[0]))
        except PolicyError as exc:
            return _policy_error(exc)
        return JSONResponse({"version": version})

    def dataplanes(self) -> list[dict[str, Any]]:
        """Every data plane any replica knows, this replica's own fresh from memory."""
        out = dict(self._remote_status)
        for node, status in self._departed.items():
            out[node] = status.to_dict()
        for node, sub in self._subscribers.items():
            out[node] = sub.status.to_dict()
        return [out[k] for k in sorted(out)]

    async def _h_dataplanes(self, request: Request) -> Response:
        principal = self._auth(request, admin=True)
        if isinstance(principal, Response):
            return principal
        return JSONResponse({"version": self.version, "dataplanes": self.dataplanes()})

    async def _h_registry(self, request: Request) -> Response:
        principal = self._auth(request, admin=True)
        if isinstance(principal, Response):
            return principal
        items = [{"id": rid, **reg.to_dict()} for rid, reg in sorted(self._registrations.items())]
        return JSONResponse({"registrations": items})

    async def _h_tokens(self, request: Request) -> Response:
        checked = await self._authed_json(request, admin=True)
        if isinstance(checked, Response):
            return checked
        _, data = checked
        try:
            token = await self.create_token(
                str(data.get("namespace") or "default"),
                str(data.get("service_account") or ""),
                admin=bool(data.get("admin")),
                name=str(data.get("name") or ""),
            )
        except ValueError as exc:
            return _error(400, str(exc))
        return JSONResponse({"token": token}, status_code=201)

    async def _h_revoke(self, request: Request) -> Response:
        """Revoke a token by presenting it (only its hash is stored, so the token itself names it)."""
        checked = await self._authed_json(request, admin=True)
        if isinstance(checked, Response):
            return checked
        principal, data = checked
        token = data.get("token")
        if not isinstance(token, str) or not token:
            return _error(400, "token: the token to revoke is required")
        key = hash_token(token)
        if not await self.store.delete(TOKENS_PREFIX + key):
            return _error(404, "no such token")
        self._tokens.pop(key, None)
        log.info("%s revoked a token", principal)
        return Response(status_code=204)


def _body(chunk: bytes) -> Message:
    return {"type": "http.response.body", "body": chunk, "more_body": True}


class _EventStream(Response):
    """A server-sent event stream for one data plane.

    Lighter than Starlette's StreamingResponse (no task group, no copy of the last chunk
    kept while waiting): one waiting coroutine and one disconnect listener per stream.
    """

    def __init__(self, plane: ControlPlane, sub: _Subscriber) -> None:
        self.plane = plane
        self.sub = sub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = self.sub

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            sub.gone = True
            sub.wake.set()

        listener = asyncio.create_task(listen())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            await self.plane._stream(sub, send)
        except OSError:
            pass  # the data plane went away mid-write
        finally:
            listener.cancel()
            self.plane._unsubscribe(sub)


def _label(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"label {item!r}: use key=value")
    return key, value


def _not_yours(principal: Principal, namespace: str, service_account: str) -> JSONResponse:
    return _error(403, f"this token is for {principal}, not {namespace}/{service_account}")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _policy_error(exc: PolicyError) -> JSONResponse:
    return JSONResponse(
        {"error": str(exc), "errors": [_issue(i) for i in exc.issues]},
        status_code=400,
    )


def _issue(issue: Issue) -> dict[str, Any]:
    return {"resource": issue.resource, "field": issue.field, "message": issue.message, "document": issue.document}


async def _read_body(request: Request) -> bytes | Response:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > _MAX_BODY:
        return _error(413, f"the body is over {_MAX_BODY} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > _MAX_BODY:
            return _error(413, f"the body is over {_MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
