"""ASGI adapter: MeshMiddleware and serve() (issues #4, #5)."""
