"""ASGI adapter: ``serve()`` / ``MeshServer`` (uvicorn with the mesh's mTLS) and the peer's identity."""

from ._peer import PeerInfo, peer_identity
from ._serve import MeshServer, serve

__all__ = ["MeshServer", "PeerInfo", "peer_identity", "serve"]
