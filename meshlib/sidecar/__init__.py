"""The sidecar proxy (issue #8)."""
