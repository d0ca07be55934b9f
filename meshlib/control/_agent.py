"""The data plane's side of the control plane: subscribe, apply, ACK or NACK, cache, register, certificates.

The agent runs in a daemon thread of its own with its own event loop, because a
``Mesh`` outlives the loop that made it: ``asyncio.run(Mesh.connect(...))`` closes
its loop at once, then the service serves in another loop, or in threads with the
sync client. Whatever the caller's loops do, the stream stays subscribed.

On the stream (``GET /v1/stream``, server-sent events) every ``snapshot`` event is
built and swapped in whole through ``Mesh.update``; the agent then ACKs it, or NACKs
it with the error and keeps the configuration in force (xDS semantics: a data plane
never runs half a change, nor one it could not check). Each applied snapshot is
also written to a cache file, so a data plane that restarts while the control plane
is down starts from the last configuration it ran, logged as stale with its age.
A stream that breaks, or stays silent for three keepalive periods, is reconnected
with full-jitter exponential backoff (many data planes must not reconnect in step
after a control-plane restart).

The same thread heartbeats the service registrations (``register``) and the
certificate issuer (``RemoteIssuer``) talks to the same control plane from the
certificate renewal thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias, cast
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from tenacity import RetryCallState, wait_random_exponential

from .._exceptions import (
    CertificateError,
    CertificateRequestError,
    ControlPlaneAuthError,
    ControlPlaneError,
    ControlPlaneUnavailableError,
)
from ..mesh import Mesh
from ..policy import Snapshot, SpiffeId, Workload
from ..security import IssuedCertificate, WorkloadCertificates

__all__ = [
    "DEFAULT_KEEPALIVE",
    "Agent",
    "CachedSnapshot",
    "MeshFactory",
    "RegisteredEndpoint",
    "RemoteIssuer",
    "Verify",
    "backoff",
    "default_cache_dir",
    "read_cache",
    "write_cache",
]

log = logging.getLogger("meshlib.control")

DEFAULT_KEEPALIVE = 10.0
"""The control plane's default keepalive period; a stream silent for three of them is dead."""
BACKOFF_BASE = 0.2
BACKOFF_CAP = 10.0
REQUEST_TIMEOUT = 5.0
"""Bound on one ACK, registration or certificate call: the control plane answers those at once."""
CLOSE_TIMEOUT = 2.0
"""How long ``close`` waits for the deregistration and the thread: shutdown must never hang on a dead peer."""
CACHE_FILE = "snapshot.json"
REPORT_INTERVAL = 5.0
"""Seconds between two reports of RED metrics, breakers and the certificate to the control plane (its dashboard)."""
STILL_DOWN_EVERY = 60.0
"""Seconds between the warnings that the control plane is still unreachable (each attempt logs at DEBUG)."""

Verify: TypeAlias = bool | str | os.PathLike[str] | ssl.SSLContext
"""How to check an HTTPS control plane: True (system CAs), False, a CA bundle path, or an SSLContext."""
MeshFactory: TypeAlias = Callable[[Snapshot, WorkloadCertificates | None], Mesh]
"""Builds the Mesh from the first configuration (``Mesh.connect`` passes one that keeps its own options)."""

_WAIT = wait_random_exponential(multiplier=BACKOFF_BASE, max=BACKOFF_CAP)


@dataclass(frozen=True, slots=True)
class _Attempt:
    """The one field of tenacity's ``RetryCallState`` its wait strategies read."""

    attempt_number: int


def backoff(attempt: int) -> float:
    """Seconds to wait before reconnection ``attempt`` (from 1): a uniform draw in [0, min(10, 0.2·2^(attempt-1))].

    Full jitter (tenacity's ``wait_random_exponential``): after a control-plane
    restart thousands of data planes spread their reconnections instead of coming
    back in waves.
    """
    return float(_WAIT(cast(RetryCallState, _Attempt(max(1, attempt)))))


def default_cache_dir(workload: Workload) -> Path:
    """``$MESHLIB_CACHE_DIR/<ns>.<name>``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/meshlib/<ns>.<name>``.

    One folder per workload, so several workloads on one machine share a root.
    """
    leaf = f"{workload.namespace}.{workload.name}"
    root = os.environ.get("MESHLIB_CACHE_DIR")
    if root:
        return Path(root) / leaf
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "meshlib" / leaf


# -- the cache -------------------------------------------------------------------


@dataclass(frozen=True)
class CachedSnapshot:
    """The last configuration a data plane applied, as written to ``snapshot.json``."""

    version: int
    nonce: str
    written_at: float
    resources: list[dict[str, Any]]

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.written_at)


def write_cache(directory: Path, version: int, nonce: str, resources: list[dict[str, Any]]) -> Path:
    """Write ``snapshot.json`` whole: temp file, fsync, rename, so a crash never leaves half a configuration."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / CACHE_FILE
    data = json.dumps(
        {"version": version, "nonce": nonce, "written_at": time.time(), "resources": resources},
        separators=(",", ":"),
    ).encode()
    temp = directory / f".{CACHE_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a crash once the folder is synced
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def read_cache(directory: Path) -> CachedSnapshot | None:
    """The cached configuration, or None when there is none or it cannot be read (said in the log)."""
    path = directory / CACHE_FILE
    try:
        raw = json.loads(path.read_bytes())
        return CachedSnapshot(
            version=int(raw["version"]),
            nonce=str(raw["nonce"]),
            written_at=float(raw["written_at"]),
            resources=list(raw["resources"]),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("meshlib: the cached configuration %s cannot be read (%s); ignoring it", path, _reason(exc))
        return None


# -- certificates ----------------------------------------------------------------


class _NoAuthority(ControlPlaneError):
    """The control plane runs without a CA: the mesh runs without workload certificates."""


def _ssl_verify(verify: Verify) -> bool | ssl.SSLContext:
    """httpx wants a bool or an SSLContext; a CA bundle path becomes a context that trusts it."""
    if isinstance(verify, (str, os.PathLike)):
        return ssl.create_default_context(cafile=os.fspath(verify))
    return verify


def _error_text(response: httpx.Response) -> str:
    """The control plane's ``{"error": ...}`` (or ``errors``), else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip() or response.reason_phrase
    if isinstance(body, dict):
        if "error" in body:
            return str(body["error"])
        if "errors" in body:
            return "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in body["errors"])
    return str(body)[:200]


def _auth_error(url: str, response: httpx.Response, identity: SpiffeId | None) -> ControlPlaneAuthError:
    why = _error_text(response)
    if response.status_code == 401:
        return ControlPlaneAuthError(
            f"control plane {url} refused the token (401: {why}): it is unknown there; check the token "
            "(the configuration cache is not used for a bad token, which waiting does not fix)"
        )
    whom = f" for {identity}" if identity is not None else ""
    return ControlPlaneAuthError(
        f"control plane {url} refused the token{whom} (403: {why}): a workload token is bound to one "
        "namespace and service account; use the token made for this workload's identity"
    )


class RemoteIssuer:
    """``Issuer`` that sends the workload's CSR to the control plane's CA (``POST /v1/certificate``).

    Called from ``WorkloadCertificates``' renewal thread, so it is sync. The control
    plane signs for the identity the token is bound to and nothing else.
    """

    def __init__(self, url: str, token: str, verify: Verify = True, *, timeout: float = REQUEST_TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._verify = _ssl_verify(verify)
        self._timeout = timeout

    def issue(self, csr_pem: bytes, identity: SpiffeId, ttl: float) -> IssuedCertificate:
        """Sign ``csr_pem``: 401 is a ``ControlPlaneAuthError``, a refusal a ``CertificateRequestError``.

        ``ttl`` is not sent: the control plane's CA decides how long its certificates
        last (from its MeshConfig, the same one the data plane reads).
        """
        with httpx.Client(base_url=self.url, verify=self._verify, timeout=self._timeout) as client:
            response = client.post(
                "/v1/certificate",
                json={"csr": csr_pem.decode("ascii")},
                headers={"authorization": f"Bearer {self._token}"},
            )
        if response.status_code == 401:
            raise _auth_error(self.url, response, identity)
        if response.status_code in (404, 501):
            raise _NoAuthority(f"control plane {self.url} has no CA ({response.status_code}: {_error_text(response)})")
        if response.status_code in (400, 403):
            raise CertificateRequestError(
                f"control plane {self.url} refused the certificate request for {identity} "
                f"({response.status_code}: {_error_text(response)})"
            )
        if response.status_code != 200:
            raise ControlPlaneError(
                f"control plane {self.url}: POST /v1/certificate answered {response.status_code}: "
                f"{_error_text(response)}"
            )
        return _issued_from(response.json(), identity)

    def __repr__(self) -> str:
        return f"<RemoteIssuer {self.url}>"


def _issued_from(body: Mapping[str, Any], identity: SpiffeId) -> IssuedCertificate:
    """The wire answer as an ``IssuedCertificate`` (``WorkloadCertificates`` checks the key and the id)."""
    try:
        chain = str(body["certificate_chain"]).encode("ascii")
        roots = str(body["root_certificates"]).encode("ascii")
        leaf = x509.load_pem_x509_certificate(chain)
    except (KeyError, ValueError, TypeError):
        raise CertificateError("the control plane returned no readable certificate chain") from None
    return IssuedCertificate(
        chain_pem=chain,
        bundle_pem=roots,
        identity=identity,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        serial=leaf.serial_number,
    )


# -- registrations ---------------------------------------------------------------


@dataclass(eq=False)
class RegisteredEndpoint:
    """One endpoint this workload serves, heartbeated to the control plane's registry.

    ``id`` is the control plane's registration id once it answered; ``wait`` blocks
    until it has (from any thread).
    """

    address: str
    port: int
    service_port: int = 80
    protocol: str = "HTTP"
    host: str | None = None
    tls: bool = False
    id: str | None = None
    ttl: float | None = None
    _registered: threading.Event = field(default_factory=threading.Event, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    def wait(self, timeout: float | None = None) -> bool:
        """True once the control plane has accepted the registration."""
        return self._registered.wait(timeout)


# -- the stream ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Event:
    type: str
    id: str
    data: str


async def _sse_events(lines: AsyncIterator[str]) -> AsyncIterator[_Event]:
    """Server-sent events from a line stream (comments, such as ``: keepalive``, are skipped)."""
    kind, ident, data = "message", "", list[str]()
    async for line in lines:
        if not line:
            if data:
                yield _Event(kind, ident, "\n".join(data))
            kind, ident, data = "message", "", list[str]()
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "id":
            ident = value
        elif name == "data":
            data.append(value)


class _StreamEnded(Exception):
    """The control plane closed the stream, or answered it with an error status."""


def _reason(exc: BaseException) -> str:
    """A short why for a log line: the exception's class, and its message when it says more."""
    text = str(exc)
    name = type(exc).__name__
    if isinstance(exc, (_StreamEnded, ControlPlaneError)):
        return text
    if isinstance(exc, httpx.TransportError):
        return name  # httpx's messages repeat the errno soup; the class names the failure
    return f"{name}: {text}" if text else name


def _age(seconds: float) -> str:
    """``3m12s``, ``45s``, ``2h05m``, ``3d04h``: how old a cache is, at a glance."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class Agent:
    """A data plane's connection to the control plane, in a thread of its own (see the module doc).

    ``Mesh.connect`` makes and starts one; ``mesh.agent`` is it. ``version`` is the
    control plane's version in force (an int; None before the first), ``stale`` is
    True while the configuration in force is not confirmed by a live stream (booted
    from the cache, or disconnected), ``last_nack`` the error of the last snapshot
    refused.
    """

    def __init__(
        self,
        url: str,
        *,
        workload: Workload,
        token: str,
        cache_dir: str | os.PathLike[str] | None = None,
        verify: Verify = True,
        keepalive: float = DEFAULT_KEEPALIVE,
        node: str | None = None,
        report_interval: float = REPORT_INTERVAL,
    ) -> None:
        self.url = url.rstrip("/")
        self.workload = workload
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(workload)
        self.keepalive = keepalive
        self.report_interval = report_interval
        """Seconds between reports to ``POST /v1/report`` (read before each wait: may be changed while running)."""
        self.node = node or f"{workload.name}.{workload.namespace}-{os.getpid()}-{secrets.token_hex(3)}"
        self._token = token
        self._verify = verify
        self._ssl = _ssl_verify(verify)
        self.mesh: Mesh | None = None
        self.version: int | None = None
        """The control plane's config version in force (from the stream, or the cache at a stale boot)."""
        self.nonce: str | None = None
        self.connected = False
        self.stale = False
        self.last_nack: str | None = None
        self.last_error: str | None = None
        """Why the last connection attempt failed (None once connected)."""
        self._factory: MeshFactory | None = None
        self._ready: concurrent.futures.Future[Mesh] = concurrent.futures.Future()
        self._changed = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: httpx.AsyncClient | None = None
        self._stopping: asyncio.Event | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._registrations: list[RegisteredEndpoint] = []
        self._heartbeats: set[asyncio.Task[None]] = set()
        self._deregister_on_close = True
        self._no_authority = False
        self._down_warned_at: float | None = None

    # -- life cycle ----------------------------------------------------------------

    def start(self, factory: MeshFactory) -> concurrent.futures.Future[Mesh]:
        """Start the thread; the future resolves with the Mesh once there is a configuration to run.

        That is the first snapshot from the control plane, or the cached one when the
        first attempt fails (the agent then keeps reconnecting). It fails at once with
        ``ControlPlaneAuthError`` for a refused token; with no cache it waits for the
        control plane for as long as the caller lets it.
        """
        if self._thread is not None:
            raise RuntimeError("the agent is already started")
        self._factory = factory
        self._thread = threading.Thread(target=self._run, name=f"meshlib-agent-{self.node}", daemon=True)
        self._thread.start()
        self._loop_ready.wait()
        return self._ready

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        self._loop_ready.set()
        try:
            loop.run_until_complete(self._main())
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _main(self) -> None:
        assert self._stopping is not None
        self._client = httpx.AsyncClient(
            base_url=self.url,
            verify=self._ssl,
            headers={"authorization": f"Bearer {self._token}"},
            timeout=REQUEST_TIMEOUT,
        )
        stream = asyncio.create_task(self._stream_forever(), name="meshlib-agent-stream")
        report = asyncio.create_task(self._report_forever(), name="meshlib-agent-report")
        try:
            await self._stopping.wait()
        finally:
            if self._deregister_on_close:
                await self._deregister_all()
            tasks = [stream, report, *self._heartbeats]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._client.aclose()
            if not self._ready.done():
                self._ready.cancel()

    def close(self, timeout: float = CLOSE_TIMEOUT, *, deregister: bool = True) -> None:
        """Deregister (best effort, bounded), stop the stream and the thread. Idempotent, from any thread.

        ``deregister=False`` leaves the registrations to expire after the control
        plane's TTL, as if the process had died (for a replacement that takes over the
        same address, or a test of the expiry).
        """
        if self._closed:
            return
        self._closed = True
        self._deregister_on_close = deregister
        loop, thread, stopping = self._loop, self._thread, self._stopping
        if loop is None or thread is None or stopping is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already closed
            loop.call_soon_threadsafe(stopping.set)
        if thread is not threading.current_thread():
            thread.join(timeout + 1.0)
        with self._changed:
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def wait_for_version(self, version: int, timeout: float = 5.0) -> bool:
        """Block until the control plane's ``version`` (or a later one) is in force; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: (self.version or 0) >= version or self._closed, timeout) and (
                (self.version or 0) >= version
            )

    def fall_back_to_cache(self, why: str, timeout: float = CLOSE_TIMEOUT) -> None:
        """Boot from the cache now if no configuration came yet (blocking; from any thread but the agent's).

        For ``Mesh.connect`` whose timeout ran out while the control plane neither
        answered nor refused (a hung server, a black-holed route): a cache is better
        than failing, exactly as when the connection is refused.
        """
        loop = self._loop
        if loop is None or self._closed or self._ready.done():
            return
        future = asyncio.run_coroutine_threadsafe(self._boot_from_cache(why), loop)
        with contextlib.suppress(Exception):
            future.result(timeout)

    def unavailable_error(self) -> ControlPlaneUnavailableError:
        """What ``Mesh.connect`` raises when neither the control plane nor the cache gave a configuration."""
        if self.last_nack is not None:
            why = f"answered, but this data plane refused its configuration: {self.last_nack}"
        else:
            why = f"unreachable ({self.last_error or 'no answer in time'})"
        return ControlPlaneUnavailableError(
            f"control plane {self.url} {why}; and no cached configuration in {self.cache_dir}: "
            "start the control plane, or give cache_dir= the folder of an earlier run"
        )

    # -- the stream ----------------------------------------------------------------

    async def _stream_forever(self) -> None:
        attempt = 0
        while True:
            received = False
            try:
                received = await self._stream_once()
                error: BaseException = _StreamEnded("the control plane closed the stream")
            except ControlPlaneAuthError as exc:
                if not self._ready.done():
                    self._fail(exc)
                    return
                error = exc  # the token was revoked while running: keep the configuration, keep trying
            except httpx.ReadTimeout:
                error = _StreamEnded(f"the stream was silent for {3 * self.keepalive:g} s (3 keepalives)")
            except (httpx.HTTPError, OSError, _StreamEnded, ValueError) as exc:
                error = exc
            was_connected, self.connected = self.connected, False
            self.last_error = _reason(error)
            attempt = 1 if received else attempt + 1
            delay = backoff(attempt)
            if self._ready.done():
                self.stale = True
            else:
                await self._boot_from_cache(f"control plane {self.url} unreachable ({self.last_error})")
            self._log_down(was_connected, delay)
            await asyncio.sleep(delay)

    def _log_down(self, was_connected: bool, delay: float) -> None:
        """One warning when the stream breaks, then one a minute while it stays down; each attempt at DEBUG."""
        now = time.monotonic()
        serving = (
            f"serving version {self.version} (stale until it reconnects)"
            if self._ready.done()
            else f"no configuration yet (none cached in {self.cache_dir})"
        )
        if was_connected or self._down_warned_at is None:
            what = "disconnected" if was_connected else "unreachable"
            log.warning(
                "meshlib: control plane %s %s (%s); reconnecting in %.1f s, %s",
                self.url,
                what,
                self.last_error,
                delay,
                serving,
            )
            self._down_warned_at = now
        elif now - self._down_warned_at >= STILL_DOWN_EVERY:
            log.warning("meshlib: control plane %s still unreachable (%s); %s", self.url, self.last_error, serving)
            self._down_warned_at = now
        else:
            log.debug("meshlib: control plane %s: %s; retrying in %.1f s", self.url, self.last_error, delay)

    async def _stream_once(self) -> bool:
        """One subscription, until it breaks; True if at least one snapshot came through it."""
        assert self._client is not None
        wl = self.workload
        params: list[tuple[str, str | int | float | bool | None]] = [
            ("node", self.node),
            ("workload", wl.name),
            ("namespace", wl.namespace),
            ("service_account", wl.service_account),
            *(("label", f"{k}={v}") for k, v in sorted(wl.labels.items())),
        ]
        if self.version is not None:
            params.append(("version", str(self.version)))
        timeout = httpx.Timeout(REQUEST_TIMEOUT, read=3 * self.keepalive)
        received = False
        async with self._client.stream(
            "GET", "/v1/stream", params=params, headers={"accept": "text/event-stream"}, timeout=timeout
        ) as response:
            if response.status_code in (401, 403):
                await response.aread()
                raise _auth_error(self.url, response, wl.spiffe_id)
            if response.status_code != 200:
                await response.aread()
                raise _StreamEnded(f"GET /v1/stream answered {response.status_code}: {_error_text(response)}")
            self.connected = True
            self.last_error = None
            self._down_warned_at = None
            log.info("meshlib: connected to control plane %s as node %s", self.url, self.node)
            async for event in _sse_events(response.aiter_lines()):
                if event.type == "snapshot":
                    await self._on_snapshot(event)
                    received = True
        return received

    async def _on_snapshot(self, event: _Event) -> None:
        """Apply one pushed snapshot whole, then ACK it; NACK it with the error and keep the old one."""
        try:
            body = json.loads(event.data)
            version, nonce = int(body["version"]), str(body.get("nonce") or event.id)
            resources = list(body["resources"])
        except (ValueError, KeyError, TypeError) as exc:
            await self._nack(event.id, None, f"unreadable snapshot event ({_reason(exc)})")
            return
        async with self._lock:  # one configuration decision at a time: a push, or a boot from the cache
            await self._apply(version, nonce, resources)

    async def _apply(self, version: int, nonce: str, resources: list[dict[str, Any]]) -> None:
        try:
            snapshot = Snapshot.from_resources(resources)
            mesh = self.mesh
            if mesh is None:
                mesh = await asyncio.to_thread(self._build, snapshot, True)
            else:
                mesh.update(snapshot)
                if mesh.certificates is None and not self._no_authority:
                    await asyncio.to_thread(self._attach_certificates, mesh, snapshot)
        except ControlPlaneAuthError:
            raise
        except Exception as exc:  # PolicyError, an access log that cannot be opened, a certificate refused...
            await self._nack(nonce, version, str(exc) or type(exc).__name__)
            if self.mesh is None:
                await self._boot_locked(
                    f"control plane {self.url} sent version {version}, which this data plane refused"
                )
            return
        first = self.mesh is None
        self.mesh = mesh
        self.nonce = nonce
        was_stale, self.stale = self.stale, False
        self._set_version(version)
        try:
            write_cache(self.cache_dir, version, nonce, resources)
        except OSError as exc:
            log.error("meshlib: cannot write the configuration cache in %s (%s)", self.cache_dir, _reason(exc))
        await self._ack(nonce, version, mesh.version, None)
        log.info(
            "meshlib: control plane version %d applied (snapshot %s)%s",
            version,
            mesh.version,
            "; no longer stale" if was_stale else "",
        )
        if first:
            self._resolve(mesh)

    async def _report_forever(self) -> None:
        """Post a summary of this data plane's metrics every ``report_interval`` s (best effort, for the dashboard).

        A control plane without ``/v1/report`` (an older one) answers a plain 404 or 405:
        reporting then stops, and nothing else changes.
        """
        from ._report import summarize

        assert self._client is not None
        last = time.monotonic()
        while True:  # short sleeps: a changed report_interval counts from the next one
            await asyncio.sleep(min(1.0, max(0.05, self.report_interval)))
            if time.monotonic() - last < self.report_interval:
                continue
            last = time.monotonic()
            mesh = self.mesh
            if mesh is None or not self.connected:
                continue
            try:
                body = {"node": self.node, **summarize(mesh)}
                response = await self._client.post("/v1/report", json=body)
            except (httpx.HTTPError, ValueError, TypeError) as exc:
                log.debug("meshlib: could not report to control plane %s: %s", self.url, _reason(exc))
                continue
            if response.status_code in (404, 405) and "json" not in response.headers.get("content-type", ""):
                log.debug("meshlib: control plane %s takes no reports; not reporting", self.url)
                return

    async def _nack(self, nonce: str, version: int | None, error: str) -> None:
        """Refuse a push; ``version`` is None when the event was too torn to say which it was."""
        self.last_nack = error
        current = self.mesh.version if self.mesh is not None else None
        log.error(
            "meshlib: NACK control plane %s: %s; keeping version %s",
            f"version {version}" if version is not None else f"push {nonce!r}",
            error,
            self.version if self.version is not None else "none",
        )
        await self._ack(nonce, version, current, error)

    async def _ack(self, nonce: str, version: int | None, snapshot: str | None, error: str | None) -> None:
        assert self._client is not None
        body = {"node": self.node, "nonce": nonce, "version": version, "snapshot": snapshot, "error": error}
        try:
            response = await self._client.post("/v1/ack", json=body)
            if response.status_code >= 300:
                log.warning(
                    "meshlib: control plane %s refused the %s of version %s (%d: %s)",
                    self.url,
                    "NACK" if error else "ACK",
                    version,
                    response.status_code,
                    _error_text(response),
                )
        except httpx.HTTPError as exc:  # the stream breaks too; the next connection starts over
            log.debug("meshlib: could not send the ACK of version %s (%s)", version, _reason(exc))

    # -- booting -------------------------------------------------------------------

    async def _boot_from_cache(self, why: str) -> None:
        """Start from the cached configuration (stale) when the control plane gives none; keep reconnecting.

        ``why`` is the clause the warning starts with (``control plane URL unreachable (ConnectError)``).
        """
        async with self._lock:
            await self._boot_locked(why)

    async def _boot_locked(self, why: str) -> None:
        if self.mesh is not None or self._ready.done():
            return
        cached = read_cache(self.cache_dir)
        if cached is None:
            return
        try:
            snapshot = Snapshot.from_resources(cached.resources)
            mesh = await asyncio.to_thread(self._build, snapshot, False)
        except ControlPlaneAuthError as exc:
            self._fail(exc)
            return
        except Exception as exc:
            log.error(
                "meshlib: the cached configuration in %s cannot be used (%s)", self.cache_dir, str(exc) or repr(exc)
            )
            return
        self.mesh = mesh
        self.nonce = cached.nonce
        self.stale = True
        self._down_warned_at = time.monotonic()  # this warning says it all: no second one for the same failure
        self._set_version(cached.version)
        log.warning(
            "meshlib: %s; serving cached configuration version %d from %s ago, stale until it reconnects",
            why,
            cached.version,
            _age(cached.age()),
        )
        self._resolve(mesh)

    def _build(self, snapshot: Snapshot, live: bool) -> Mesh:
        """The Mesh, with its certificate: from the control plane when live, else from the cached files."""
        assert self._factory is not None
        certificates = self._certificates(snapshot, live)
        try:
            mesh = self._factory(snapshot, certificates)
        except BaseException:
            if certificates is not None:
                certificates.stop()
            raise
        mesh.agent = self
        if self._closed:  # Mesh.connect gave up while this was being built: nobody will close it
            mesh.close()
            raise ControlPlaneError("the agent was closed while the mesh was being built")
        return mesh

    def _certificates(self, snapshot: Snapshot, live: bool) -> WorkloadCertificates | None:
        wl = self.workload
        domain = snapshot.mesh_config.trust_domain
        identity = SpiffeId.of(wl.namespace, wl.service_account, domain)
        settings = snapshot.mesh_config.certificates
        issuer = RemoteIssuer(self.url, self._token, self._verify)
        folder = self.cache_dir / "certs"
        options: dict[str, Any] = {"ttl": settings.ttl, "grace_ratio": settings.grace_ratio}
        if live:
            try:
                return WorkloadCertificates(identity, issuer, files=folder, **options)
            except _NoAuthority as exc:
                self._no_authority = True
                log.info("meshlib: %s; this workload runs without a certificate (plaintext)", exc)
                return None
            except (httpx.HTTPError, OSError) as exc:
                log.warning(
                    "meshlib: could not get a certificate from %s (%s); trying the cached one", self.url, _reason(exc)
                )
        if not folder.exists():
            return None
        try:
            certificates = WorkloadCertificates.from_files(identity, issuer, folder, **options)
        except CertificateError as exc:
            log.warning(
                "meshlib: no usable cached certificate (%s): %s has no workload certificate until the control "
                "plane issues one",
                exc,
                identity,
            )
            return None
        log.info(
            "meshlib: using the cached certificate for %s (valid until %s)",
            identity,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(certificates.issued.not_after)),
        )
        return certificates

    def _attach_certificates(self, mesh: Mesh, snapshot: Snapshot) -> None:
        """A mesh that booted without a certificate gets one once the control plane is back."""
        try:
            certificates = self._certificates(snapshot, True)
        except Exception as exc:
            log.warning("meshlib: could not get a certificate from %s (%s)", self.url, _reason(exc))
            return
        if certificates is not None:
            mesh._adopt_certificates(certificates)

    def _resolve(self, mesh: Mesh) -> None:
        try:
            self._ready.set_result(mesh)
        except concurrent.futures.InvalidStateError:  # the agent is closing: nobody will use this mesh
            mesh.agent = None
            mesh.close()

    def _fail(self, exc: BaseException) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self._ready.set_exception(exc)

    def _set_version(self, version: int) -> None:
        with self._changed:
            self.version = version
            self._changed.notify_all()

    # -- registry ------------------------------------------------------------------

    def register(
        self,
        address: str,
        port: int,
        *,
        service_port: int = 80,
        protocol: str = "HTTP",
        host: str | None = None,
        tls: bool | None = None,
    ) -> RegisteredEndpoint:
        """Register an endpoint this workload serves and heartbeat it every ttl/3; returns at once.

        From any thread or loop. ``host`` is the service host (default
        ``NAME.NS.svc.cluster.local``); ``tls`` (default: the mesh has a certificate)
        marks the endpoint for the mesh's mTLS. The registration survives a
        control-plane restart: the next heartbeat registers it again.
        """
        if self._loop is None or self._closed:
            raise ControlPlaneError("the agent is not running: register after Mesh.connect, before close")
        if tls is None:
            tls = self.mesh is not None and self.mesh.certificates is not None
        registration = RegisteredEndpoint(address, port, service_port, protocol, host, tls)
        asyncio.run_coroutine_threadsafe(self._start_heartbeat(registration), self._loop)
        return registration

    def deregister(self, registration: RegisteredEndpoint | None = None) -> concurrent.futures.Future[None]:
        """Stop heartbeating ``registration`` (all of them by default) and delete it from the registry.

        Returns at once; the future completes when the control plane has answered
        (or could not be reached: the TTL then drops the endpoint).
        """
        loop = self._loop
        if loop is None or self._closed or loop.is_closed():
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            done.set_result(None)
            return done
        return asyncio.run_coroutine_threadsafe(self._deregister(registration), loop)

    def advertise_address(self) -> str:
        """The local address the control plane is reached from: what to register for a wildcard bind."""
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.socket(
            socket.AF_INET6 if ":" in (parts.hostname or "") else socket.AF_INET, socket.SOCK_DGRAM
        ) as s:
            s.connect((parts.hostname or "127.0.0.1", port))  # UDP: picks the route, sends nothing
            return str(s.getsockname()[0])

    async def _start_heartbeat(self, registration: RegisteredEndpoint) -> None:
        self._registrations.append(registration)
        task = asyncio.create_task(self._heartbeat(registration), name="meshlib-agent-heartbeat")
        registration._task = task
        self._heartbeats.add(task)
        task.add_done_callback(self._heartbeats.discard)

    async def _heartbeat(self, registration: RegisteredEndpoint) -> None:
        assert self._client is not None
        wl = self.workload
        body: dict[str, Any] = {
            "node": self.node,
            "workload": wl.name,
            "namespace": wl.namespace,
            "service_account": wl.service_account,
            "labels": dict(wl.labels),
            "address": registration.address,
            "port": registration.port,
            "service_port": registration.service_port,
            "protocol": registration.protocol,
            "tls": registration.tls,
        }
        if registration.host is not None:
            body["host"] = registration.host
        where = f"{registration.address}:{registration.port}"
        failures = 0
        while True:
            try:
                response = await self._client.post("/v1/register", json=body)
                if response.status_code != 200:
                    raise _StreamEnded(f"POST /v1/register answered {response.status_code}: {_error_text(response)}")
                answer = response.json()
                registration.id = str(answer["id"])
                registration.ttl = float(answer["ttl"])
                if failures or not registration._registered.is_set():
                    log.info(
                        "meshlib: registered %s with control plane %s as %s (ttl %g s)",
                        where,
                        self.url,
                        registration.id,
                        registration.ttl,
                    )
                registration._registered.set()
                failures = 0
                delay = registration.ttl / 3
            except (httpx.HTTPError, _StreamEnded, ValueError, KeyError, TypeError) as exc:
                failures += 1
                delay = backoff(failures)
                if registration.ttl is not None:
                    delay = min(delay, registration.ttl / 3)
                (log.warning if failures == 1 else log.debug)(
                    "meshlib: could not register %s with control plane %s (%s); retrying",
                    where,
                    self.url,
                    _reason(exc),
                )
            await asyncio.sleep(delay)

    async def _deregister(self, registration: RegisteredEndpoint | None) -> None:
        chosen = [r for r in self._registrations if registration is None or r is registration]
        for r in chosen:
            self._registrations.remove(r)
            if r._task is not None:
                r._task.cancel()
        await asyncio.gather(*(self._delete(r) for r in chosen))

    async def _delete(self, registration: RegisteredEndpoint) -> None:
        assert self._client is not None
        if registration.id is None:
            return
        try:
            response = await self._client.delete(f"/v1/register/{registration.id}")
            if response.status_code < 300 or response.status_code == 404:
                log.info("meshlib: deregistered %s:%d", registration.address, registration.port)
            else:
                log.warning(
                    "meshlib: control plane %s refused to deregister %s (%d: %s); the ttl will drop it",
                    self.url,
                    registration.id,
                    response.status_code,
                    _error_text(response),
                )
        except httpx.HTTPError as exc:
            log.warning(
                "meshlib: could not deregister %s (%s); the control plane drops it after its ttl",
                registration.id,
                _reason(exc),
            )

    async def _deregister_all(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._deregister(None), CLOSE_TIMEOUT)

    def __repr__(self) -> str:
        state = "connected" if self.connected else "stale" if self.stale else "connecting"
        return f"<Agent {self.node} {self.url} version={self.version} {state}>"
