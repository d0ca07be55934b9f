"""CA, workload certificates and TLS contexts (issue #4)."""
