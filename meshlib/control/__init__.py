"""The control plane (configuration, push, registry, CA, stores) and the data-plane agent behind ``Mesh.connect``."""

from ._agent import Agent, CachedSnapshot, RegisteredEndpoint, RemoteIssuer, default_cache_dir, read_cache
from ._registry import Registration
from ._server import ControlPlane, DataPlaneStatus
from ._store import Entry, Event, FileStore, Store, StoreError, open_store

__all__ = [
    "Agent",
    "CachedSnapshot",
    "ControlPlane",
    "DataPlaneStatus",
    "Entry",
    "Event",
    "FileStore",
    "RegisteredEndpoint",
    "Registration",
    "RemoteIssuer",
    "Store",
    "StoreError",
    "default_cache_dir",
    "open_store",
    "read_cache",
]
