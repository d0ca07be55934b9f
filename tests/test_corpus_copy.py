"""The corpus copy in tests/fixtures is the shared corpus, unchanged."""

from __future__ import annotations

import pytest
from _corpus import CORPUS, SHARED_CORPUS


def test_the_fixture_corpus_is_an_unchanged_copy_of_the_shared_one() -> None:
    if not SHARED_CORPUS.is_dir():
        pytest.skip("no ../shared beside this checkout")
    shared = sorted(p.name for p in SHARED_CORPUS.glob("*.yaml"))
    assert sorted(p.name for p in CORPUS.glob("*.yaml")) == shared
    for name in shared:
        assert (CORPUS / name).read_bytes() == (SHARED_CORPUS / name).read_bytes(), name
