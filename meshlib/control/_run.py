"""``meshlib control-plane``: a ControlPlane on uvicorn, with its store, CA, admin token and config files."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from .._exceptions import CertificateError, MeshError, PolicyError
from ..policy import DEFAULT_TRUST_DOMAIN, Snapshot
from ..security import CertificateAuthority
from ._server import ControlPlane
from ._store import FileStore, Store, open_store
from ._tokens import new_token

__all__ = ["ControlPlaneOptions", "default_state_dir", "run_control_plane"]

log = logging.getLogger("meshlib.control")

CA_KEY = "ca"
_CA_FILES = ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem", "meshlib.json")


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "meshlib" / "control-plane"


@dataclass
class ControlPlaneOptions:
    config: Sequence[str] = ()
    listen: str = "127.0.0.1:15010"
    store: str | None = None
    state_dir: Path = field(default_factory=default_state_dir)
    ca: Path | None = None
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    admin_token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    registry_ttl: float = 10.0
    keepalive: float = 10.0


def _admin_token(path: Path) -> str:
    """The token in ``path`` (the admin token, or the view token), made 0600 at first start; printed nowhere."""
    if path.exists():
        token = path.read_text().strip()
        if not token:
            raise MeshError(f"{path}: the admin token file is empty")
        if path.stat().st_mode & 0o077:
            raise MeshError(f"{path}: the admin token file is readable by others; chmod 600 it")
        return token
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = new_token()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    log.info("wrote a new token to %s", path)
    return token


async def _shared_ca(store: Store, trust_domain: str) -> CertificateAuthority:
    """With a shared store and no --ca, the replicas share one CA kept in the store (Istio keeps it in a Secret)."""
    for _ in range(3):
        entry = await store.get(CA_KEY)
        if entry is not None:
            with tempfile.TemporaryDirectory() as tmp:
                os.chmod(tmp, 0o700)
                for name, text in entry.value.items():
                    mode = 0o600 if name == "ca-key.pem" else 0o644
                    fd = os.open(Path(tmp) / name, os.O_WRONLY | os.O_CREAT, mode)
                    with os.fdopen(fd, "w") as f:
                        f.write(text)
                return CertificateAuthority.load(tmp, trust_domain=trust_domain)
        ca = CertificateAuthority.create(trust_domain)
        with tempfile.TemporaryDirectory() as tmp:
            ca.save(tmp, overwrite=True)
            files = {name: (Path(tmp) / name).read_text() for name in _CA_FILES if (Path(tmp) / name).exists()}
        if await store.compare_and_put(CA_KEY, files, 0):
            log.info("made the mesh's CA for %s and stored it for every replica", trust_domain)
            return ca
    raise MeshError("could not agree on a CA with the other replicas; pass --ca DIR")


async def _ca(options: ControlPlaneOptions, store: Store) -> CertificateAuthority:
    if options.ca is not None:
        return CertificateAuthority.load(options.ca, trust_domain=options.trust_domain)
    if isinstance(store, FileStore):
        folder = options.state_dir / "ca"
        if (folder / "ca-key.pem").exists():
            return CertificateAuthority.load(folder, trust_domain=options.trust_domain)
        ca = CertificateAuthority.create(options.trust_domain)
        ca.save(folder)
        log.info("made the mesh's CA in %s", folder)
        return ca
    return await _shared_ca(store, options.trust_domain)


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise MeshError(f"--listen {listen!r}: use HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


async def run_control_plane(options: ControlPlaneOptions) -> int:
    """Serve until SIGINT/SIGTERM; return the exit status."""
    host, port = _split_listen(options.listen)
    startup = None
    if options.config:
        startup = Snapshot.from_files(*options.config)  # refuse bad files before touching the store
    admin_token = _admin_token(options.admin_token_file or options.state_dir / "admin-token")
    view_token = _admin_token(options.state_dir / "view-token")  # read-only: the dashboard's
    store = open_store(options.store, options.state_dir)
    await store.start()
    try:
        ca = await _ca(options, store)
    finally:
        await store.close()
    plane = ControlPlane(
        store,
        ca=ca,
        admin_token=admin_token,
        registry_ttl=options.registry_ttl,
        keepalive=options.keepalive,
        view_token=view_token,
    )
    tls: dict[str, str] = {}
    if options.tls_cert or options.tls_key:
        if not (options.tls_cert and options.tls_key):
            raise MeshError("--tls-cert and --tls-key go together")
        tls = {"ssl_certfile": str(options.tls_cert), "ssl_keyfile": str(options.tls_key)}
    config = uvicorn.Config(
        plane.app,
        host=host,
        port=port,
        lifespan="off",  # started and stopped here, around the config files' apply
        log_level="warning",
        timeout_graceful_shutdown=2,
        # Data planes ACK over a kept-alive connection; pushes may be minutes apart.
        timeout_keep_alive=max(75, int(4 * options.keepalive)),
        **tls,  # type: ignore[arg-type]
    )
    server = uvicorn.Server(config)
    await plane.start()
    try:
        if startup is not None:
            version = await plane.apply(startup.resources, who="config:" + ",".join(options.config))
            log.info("configuration from %s is version %d", ", ".join(options.config), version)

        def shut_down() -> None:
            plane.drain()  # streams end first, or uvicorn would wait for them
            server.should_exit = True

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, shut_down)
        serving = asyncio.create_task(server.serve())
        while not server.started:  # say where it listens only once it does (port 0 included)
            if serving.done():
                await serving  # raises what stopped it (a port in use...)
                return 1
            await asyncio.sleep(0.01)
        bound = next((sock.getsockname()[1] for srv in server.servers for sock in srv.sockets), port)
        scheme = "https" if tls else "http"
        print(
            f"meshlib control plane on {scheme}://{host}:{bound} (replica {plane.replica}, version {plane.version}); "
            f"admin token in {options.admin_token_file or options.state_dir / 'admin-token'}; "
            f"dashboard on {scheme}://{host}:{bound}/dashboard (view token in {options.state_dir / 'view-token'})",
            flush=True,
        )
        await serving
    finally:
        await plane.stop()
    return 0


def main(options: ControlPlaneOptions) -> int:
    try:
        return asyncio.run(run_control_plane(options))
    except (PolicyError, CertificateError, MeshError, ssl.SSLError, OSError) as exc:
        print(f"meshlib control-plane: {exc}", flush=True)
        return 1
