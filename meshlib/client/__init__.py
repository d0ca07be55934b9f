"""httpx adapters: AsyncMeshTransport and MeshTransport (issue #3)."""
