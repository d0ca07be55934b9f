"""RED metrics, traces and access logs (issue #6)."""
