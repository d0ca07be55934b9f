"""Control plane and data-plane agent (issue #7)."""
