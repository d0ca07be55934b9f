"""ASGI adapter: ``MeshMiddleware`` (inbound policy), ``serve()`` / ``MeshServer`` (uvicorn with mTLS), the peer."""

from ._middleware import CustomHook, MeshMiddleware, RequestPrincipalHook
from ._peer import PeerInfo, peer_identity
from ._serve import MeshServer, serve

__all__ = ["CustomHook", "MeshMiddleware", "RequestPrincipalHook", "MeshServer", "PeerInfo", "peer_identity", "serve"]
