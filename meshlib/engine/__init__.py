"""Sans-IO decision engines: they take ``now`` and return decisions (issue #3)."""
