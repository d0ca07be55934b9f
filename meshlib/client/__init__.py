"""httpx adapters: every call of a plain httpx client goes through the mesh."""

from ._async import AsyncMeshTransport
from ._sync import MeshTransport

__all__ = ["AsyncMeshTransport", "MeshTransport"]
